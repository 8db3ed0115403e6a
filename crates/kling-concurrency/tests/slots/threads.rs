//! Creates and queries from tasks on two worker threads at once, each through its own clone of
//! the layer's service (each clone keeps its own handle on the backend): the slots in use never
//! exceed the capacity, and every slot comes back. And the backend alone, with releases on one
//! thread racing creates that join the queue on the other: no slot granted twice or lost, and
//! waiters served in the order they joined.

use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_concurrency::backend::{InProcess, SlotBackend, SlotKey, SlotOp, TaskRef, TaskUpdate};
use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
use kling_core::error::BoxError;
use kling_core::signals::Waited;
use kling_core::{AccountId, Outcome, TaskStatus};
use tower::{Layer, Service, ServiceExt};

use crate::support::*;

/// The fake server, counting the tasks it runs: a create starts one, a query of a finished task
/// reports it ended (counted down before the layer reads the answer and frees its slot).
#[derive(Clone)]
struct Counting {
    fake: Fake,
    running: Arc<AtomicU32>,
    most: Arc<AtomicU32>,
}

impl Service<Request<Full<Bytes>>> for Counting {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Ready<Result<Response<Full<Bytes>>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let create = req.method() == Method::POST;
        let mut answer = self.fake.call(req).into_inner();
        if create {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
        } else if let Ok(response) = &mut answer
            && Outcome::ensure(response)
                .ok()
                .and_then(|o| o.task().map(|t| t.status.is_terminal()))
                == Some(true)
        {
            self.running.fetch_sub(1, Ordering::SeqCst);
        }
        ready(answer)
    }
}

/// `tasks` tasks each run `lives` create, finish, query lives through a service clone of a
/// layer with `capacity` slots, on two worker threads. Returns the most tasks running at once
/// and how many creates waited for their slots.
async fn lives(capacity: u32, tasks: usize, lives: usize) -> (u32, usize) {
    let fake = Fake::new();
    let counting = Counting {
        fake: fake.clone(),
        running: Arc::new(AtomicU32::new(0)),
        most: Arc::new(AtomicU32::new(0)),
    };
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(capacity)).unwrap();
    let svc = layer.layer(counting.clone());
    let waited = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..tasks)
        .map(|_| {
            let (mut svc, fake, waited) = (svc.clone(), fake.clone(), waited.clone());
            tokio::spawn(async move {
                for _ in 0..lives {
                    let response = svc.ready().await.unwrap().call(create()).await.unwrap();
                    if response.extensions().get::<Waited>().is_some() {
                        waited.fetch_add(1, Ordering::SeqCst);
                    }
                    let id = Outcome::of(&response).unwrap().task().unwrap().id.clone();
                    // The task runs a while: other tasks create meanwhile (and wait, when the
                    // slots are few).
                    tokio::task::yield_now().await;
                    fake.finish(&id);
                    let query = get(&format!("/v1/videos/text2video/{id}"));
                    svc.ready().await.unwrap().call(query).await.unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(
        fake.creates() as usize,
        tasks * lives,
        "every create was sent"
    );
    assert_eq!(counting.running.load(Ordering::SeqCst), 0);
    assert_eq!(
        pool_state(&handle, &video()).await,
        (0, capacity, 0),
        "every slot came back, nobody waits"
    );
    assert_eq!(handle.snapshot().await.unwrap().pools()[0].tasks, 0);
    (
        counting.most.load(Ordering::SeqCst),
        waited.load(Ordering::SeqCst),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_threads_waiting_for_few_slots_never_exceed_them() {
    let (most, waited) = lives(3, 16, 200).await;
    assert!(most <= 3, "{most} tasks ran at once on 3 slots");
    // The limit was reached and creates waited (so both were tested): 16 tasks compete.
    assert_eq!(most, 3);
    assert!(waited > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_threads_on_the_fast_path_never_exceed_the_slots() {
    // As many slots as tasks: every create is granted in `call`, none waits, and every slot
    // comes back (checked in `lives`).
    let (_, waited) = lives(16, 16, 200).await;
    assert_eq!(waited, 0, "no create waits with a slot per task");
}

/// What the tasks of [`racing_waiters_and_releases`] saw.
#[derive(Default)]
struct Ledger {
    /// Taken around each acquire's first poll, so the order waiters joined the queue is known.
    order: Mutex<Joined>,
    /// The waiters, by join number, in the order the backend woke them (see [`Served`]).
    served: Arc<Mutex<Vec<usize>>>,
    /// Slots held now, and the most held at once (counted after a grant, before a give-back).
    held: AtomicU32,
    most: AtomicU32,
}

#[derive(Default)]
struct Joined {
    /// Waiters that joined the queue.
    waiters: usize,
    /// Creates granted at once while a waiter that joined before was not served yet.
    barged: usize,
    /// Waiters served before their wake could be noted: `acquire_now` queues a create with a
    /// waker that notes nothing, and a release may serve it before it is polled again.
    unnoted: Vec<usize>,
}

/// A waiter's waker: notes each wake, then wakes its task. The backend wakes a queued acquire
/// when it hands it its slots, in queue order, and before that only to have the queue's head
/// arm a timer (when a task holds slots: a lease may end); so a waiter's last wake is when it
/// was served, and without held tasks its only one.
struct Served {
    waiter: usize,
    served: Arc<Mutex<Vec<usize>>>,
    task: Waker,
}

impl Wake for Served {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.served.lock().unwrap().push(self.waiter);
        self.task.wake_by_ref();
    }
}

/// `tasks` tasks on two worker threads each take `weight` (1 or 2) of `capacity` slots
/// `lives` times, hold them a moment and give them back (by `GiveBack`, or with `by_report`
/// every other time kept under a task id and ended by a report), so that releases on one
/// thread race waiters joining on the other.
async fn racing_waiters_and_releases(
    capacity: u32,
    tasks: usize,
    lives: usize,
    by_report: bool,
) -> Arc<Ledger> {
    let backend = InProcess::new(SlotsConfig::new(capacity)).unwrap();
    let key = SlotKey::new(AccountId::new("a"), video());
    let ledger = Arc::new(Ledger::default());
    let workers: Vec<_> = (0..tasks)
        .map(|task| {
            let (backend, key, ledger) = (backend.clone(), key.clone(), ledger.clone());
            tokio::spawn(async move {
                let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
                for life in 0..lives {
                    let weight = 1 + u32::from((task + life) % 3 == 0);
                    let (first, mut acquire, served) = {
                        let mut joined = ledger.order.lock().unwrap();
                        let waiter = joined.waiters;
                        let served = Waker::from(Arc::new(Served {
                            waiter,
                            served: ledger.served.clone(),
                            task: waker.clone(),
                        }));
                        // Half the creates as the layer sends them, half by the future alone.
                        let (now, by_layer) = if life % 2 == 0 {
                            (backend.acquire_now(key.clone(), weight), true)
                        } else {
                            (Err(backend.acquire(key.clone(), weight)), false)
                        };
                        let (first, acquire) = match now {
                            Ok(granted) => (Poll::Ready(granted), None),
                            Err(mut acquire) => {
                                let cx = &mut Context::from_waker(&served);
                                (Pin::new(&mut acquire).poll(cx), Some(acquire))
                            }
                        };
                        let first = match first {
                            // Queued by `acquire_now`, and served since.
                            Poll::Ready(granted) if by_layer && acquire.is_some() => {
                                joined.waiters += 1;
                                joined.unnoted.push(waiter);
                                Some(granted)
                            }
                            Poll::Ready(granted) => {
                                // Granted at once: nobody that joined before may still wait
                                // (known exactly when each waiter is woken once).
                                let noted = ledger.served.lock().unwrap().len();
                                if !by_report && noted + joined.unnoted.len() != joined.waiters {
                                    joined.barged += 1;
                                }
                                Some(granted)
                            }
                            Poll::Pending => {
                                joined.waiters += 1;
                                None
                            }
                        };
                        (first, acquire, served)
                    };
                    let reservation = match first {
                        Some(granted) => granted.unwrap(),
                        // Polled with the waker it joined with, so that its wake is noted.
                        None => std::future::poll_fn(|_| {
                            let acquire = acquire.as_mut().expect("queued");
                            Pin::new(acquire).poll(&mut Context::from_waker(&served))
                        })
                        .await
                        .unwrap(),
                    };
                    let now = ledger.held.fetch_add(weight, Ordering::SeqCst) + weight;
                    ledger.most.fetch_max(now, Ordering::SeqCst);
                    assert!(now <= capacity, "{now} slots held of {capacity}");
                    tokio::task::yield_now().await;
                    ledger.held.fetch_sub(weight, Ordering::SeqCst);
                    let lease = Duration::from_secs(600);
                    if !by_report || life % 2 == 0 {
                        backend.apply(SlotOp::GiveBack(reservation)).await.unwrap();
                    } else {
                        let id = format!("t{task}-{life}");
                        let task = TaskRef {
                            id: Some(id.clone()),
                            external_id: None,
                        };
                        let hold = SlotOp::Hold {
                            reservation,
                            task,
                            lease,
                        };
                        backend.apply(hold).await.unwrap();
                        let updates = vec![TaskUpdate {
                            id,
                            external_id: None,
                            status: Some(TaskStatus::Succeeded),
                        }];
                        let account = AccountId::new("a");
                        let update = SlotOp::Update {
                            account,
                            updates,
                            lease,
                        };
                        let ended = backend.apply(update).await;
                        assert_eq!(ended.unwrap().released.len(), 1, "released once");
                    }
                }
            })
        })
        .collect();
    // A slot lost, or a waiter left asleep with slots free, would hang a task: fail instead.
    let all = async {
        for worker in workers {
            worker.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every create was served");
    let pools = backend.snapshot().await.unwrap();
    let pool = &pools[0];
    assert_eq!(
        (pool.in_use, pool.waiters, pool.tasks),
        (0, 0, 0),
        "every slot came back"
    );
    ledger
}

/// The waiters of `ledger` were served (last woken) in the order they joined, every one.
fn served_in_order(ledger: &Ledger) {
    let joined = ledger.order.lock().unwrap();
    let woken = ledger.served.lock().unwrap();
    let mut last = vec![None; joined.waiters];
    for (turn, &waiter) in woken.iter().enumerate() {
        last[waiter] = Some(turn);
    }
    for &waiter in &joined.unnoted {
        assert_eq!(last[waiter], None, "a waiter served unnoted was woken");
    }
    let noted: Vec<usize> = last.iter().flatten().copied().collect();
    assert_eq!(
        noted.len() + joined.unnoted.len(),
        joined.waiters,
        "every waiter served"
    );
    let out_of_order = noted.windows(2).position(|pair| pair[0] > pair[1]);
    assert_eq!(
        out_of_order, None,
        "this waiter was served after the next one that joined"
    );
    // Both paths were taken: the slots ran out, and creates waited.
    assert!(joined.waiters > 0);
    assert_eq!(
        joined.barged, 0,
        "granted at once while earlier creates waited"
    );
}

/// Give-backs on one worker thread race creates joining the queue on the other, many times:
/// the slots held never exceed the capacity, waiters are served once each in the order they
/// joined, no create is granted at once while an earlier one waits, and every slot comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_give_backs_and_waiters_never_over_grant_lose_a_slot_or_break_fifo() {
    let capacity = 3;
    let ledger = racing_waiters_and_releases(capacity, 8, 2000, false).await;
    served_in_order(&ledger);
    let woken = ledger.served.lock().unwrap().len();
    let joined = ledger.order.lock().unwrap();
    assert_eq!(
        woken + joined.unnoted.len(),
        joined.waiters,
        "each woken once"
    );
    assert_eq!(ledger.most.load(Ordering::SeqCst), capacity);
}

/// As above, with every other release a held task ended by a report (the query's path, under
/// the lock that also guards the index of task ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_reported_ends_and_waiters_never_over_grant_lose_a_slot_or_break_fifo() {
    let capacity = 3;
    let ledger = racing_waiters_and_releases(capacity, 8, 2000, true).await;
    served_in_order(&ledger);
    assert_eq!(ledger.most.load(Ordering::SeqCst), capacity);
}

/// Notes that it was woken.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A give-back on one thread races a create joining the queue on the other, with one slot,
/// many times: the create is granted at once, or the give-back hands it the slot and wakes it.
/// A create that looked for free slots before the give-back and joined the queue after it would
/// sleep with its slot free, woken by nothing.
#[test]
fn a_give_back_racing_a_create_that_joins_the_queue_always_serves_it() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let key = SlotKey::new(AccountId::new("a"), video());
    let (mut at_once, mut queued) = (0, 0);
    for _ in 0..3000 {
        let backend = InProcess::new(SlotsConfig::new(1)).unwrap();
        let Ok(Ok(held)) = backend.acquire_now(key.clone(), 1) else {
            panic!("the free slot is granted");
        };
        let start = std::sync::Barrier::new(2);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waiting = std::thread::scope(|s| {
            s.spawn(|| {
                start.wait();
                let mut give_back = backend.apply(SlotOp::GiveBack(held));
                let done = Pin::new(&mut give_back).poll(&mut Context::from_waker(Waker::noop()));
                assert!(matches!(done, Poll::Ready(Ok(_))));
            });
            start.wait();
            // Polled once, with the waker that notes the hand-off (a second poll would look
            // again and hide a missed one).
            let mut acquire = backend.acquire(key.clone(), 1);
            let waker = Waker::from(flag.clone());
            match Pin::new(&mut acquire).poll(&mut Context::from_waker(&waker)) {
                Poll::Ready(granted) => {
                    granted.unwrap();
                    None
                }
                Poll::Pending => Some(acquire),
            }
        });
        match waiting {
            None => at_once += 1,
            Some(_acquire) => {
                queued += 1;
                assert!(
                    flag.0.load(Ordering::SeqCst),
                    "a queued create was not woken by the give-back that freed its slot"
                );
            }
        }
    }
    // Both orders happened (the race is real), on a machine with two cores.
    assert!(at_once > 0, "never granted at once");
    if std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
        assert!(queued > 0, "never queued");
    }
}
