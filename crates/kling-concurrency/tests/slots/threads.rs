//! Creates and queries from tasks on two worker threads at once, each through its own clone of
//! the layer's service (each clone keeps its own handle on the backend): the slots in use never
//! exceed the capacity, and every slot comes back.

use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
use kling_core::Outcome;
use kling_core::error::BoxError;
use kling_core::signals::Waited;
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
