//! `reconcile()` against the in-process mock Kling, in paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use kling_concurrency::backend::{InProcess, SlotBackend, SlotKey, SlotOp};
use kling_concurrency::{Reconcile, SlotsConfig, TaskSlotsLayer};
use kling_core::error::BoxError;
use kling_core::{AccountId, Outcome, Pool, Product};
use kling_mock::{MockConfig, MockKling, Preset};
use tower::{Layer, Service, ServiceExt};

use crate::mock::{client, send};
use crate::support::post;

#[tokio::test(start_paused = true)]
async fn reconcile_adopts_unfinished_tasks_found_on_the_mock() {
    let minute = Duration::from_secs(60);
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .no_rate_limit()
            .task_duration(10 * minute, 10 * minute),
    )
    .unwrap();
    let mut bare = client(&mock);
    // A previous process left tasks running: two legacy videos, one new-style video, and one
    // legacy video that has already finished.
    send(
        &mut bare,
        post("/v1/videos/text2video", r#"{"prompt":"old"}"#),
    )
    .await;
    tokio::time::advance(9 * minute).await;
    send(
        &mut bare,
        post("/v1/videos/text2video", r#"{"prompt":"a"}"#),
    )
    .await;
    send(
        &mut bare,
        post("/v1/videos/image2video", r#"{"image":"x"}"#),
    )
    .await;
    send(
        &mut bare,
        post(
            "/text-to-video/kling-3.0",
            r#"{"prompt":"b","external_id":"e-1"}"#,
        ),
    )
    .await;
    tokio::time::advance(2 * minute).await;

    let account = AccountId::new("key");
    let (layer, handle) =
        TaskSlotsLayer::pair(SlotsConfig::new(5).default_account(account.clone())).unwrap();
    let kling3 = Pool::with_model(Product::Video, "kling-3.0");
    let plan = Reconcile::new("").new_style("text-to-video", kling3.clone());
    let found = handle.reconcile(&mut bare, &plan).await.unwrap();
    assert_eq!((found.unfinished, found.adopted), (3, 3));
    assert_eq!(found.skipped_paths, 0, "the mock lists every default path");
    let snapshot = handle.snapshot().await.unwrap();
    assert_eq!(
        snapshot
            .get(&account, &Pool::new(Product::Video))
            .unwrap()
            .in_use,
        2
    );
    assert_eq!(snapshot.get(&account, &kling3).unwrap().in_use, 1);
    // Reconciling again adopts nothing twice.
    let again = handle.reconcile(&mut bare, &plan).await.unwrap();
    assert_eq!((again.unfinished, again.adopted), (3, 0));

    // The restarted process now admits only what is really free: 3 more legacy videos run,
    // the 4th waits, and the mock never answers 1303.
    let mut slots = layer.layer(client(&mock));
    for _ in 0..3 {
        let r = send(
            &mut slots,
            post("/v1/videos/text2video", r#"{"prompt":"new"}"#),
        )
        .await;
        assert!(Outcome::of(&r).unwrap().is_success());
    }
    let mut fourth = tokio_test::task::spawn(
        slots
            .ready()
            .await
            .unwrap()
            .call(post("/v1/videos/text2video", r#"{"prompt":"late"}"#)),
    );
    tokio_test::assert_pending!(fourth.poll());
    assert_eq!(mock.stats().responses_by_code.get("1303"), None);

    // An adopted task ends; a list through the layer says so and lets the fourth in.
    tokio::time::advance(8 * minute).await;
    let list = Request::get("/v1/videos/text2video?pageNum=1&pageSize=30")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(&mut slots, list).await;
    tokio_test::assert_ready_ok!(fourth.poll());
    assert_eq!(mock.stats().responses_by_code.get("1303"), None);
    assert!(mock.stats().max_concurrent["video"] <= 5);
}

/// New-style list entries do not say their model: tasks of two models of one product, placed
/// by their external or task ids, are adopted each into its own model's pool, and the product is
/// listed once though the plan names it for both pools. A task the plan does not place goes
/// to the product's first pool. (Before, every task went to the first pool, and the product
/// was listed twice.)
#[tokio::test(start_paused = true)]
async fn tasks_placed_by_external_id_are_adopted_into_their_models_pools() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .no_rate_limit()
            .task_duration(Duration::from_secs(600), Duration::from_secs(600)),
    )
    .unwrap();
    let mut bare = client(&mock);
    let mut ids = Vec::new();
    for (model, ext) in [
        ("kling-3.0", "a-1"),
        ("kling-2.6", "b-1"),
        ("kling-2.6", "b-2"),
        ("kling-2.6", "c-1"),
    ] {
        let body = format!(r#"{{"prompt":"p","external_id":"{ext}"}}"#);
        let r = send(&mut bare, post(&format!("/text-to-video/{model}"), &body)).await;
        ids.push(Outcome::of(&r).unwrap().task().unwrap().id.clone());
    }
    let account = AccountId::new("key");
    let (_layer, handle) =
        TaskSlotsLayer::pair(SlotsConfig::new(5).default_account(account.clone())).unwrap();
    let kling3 = Pool::with_model(Product::Video, "kling-3.0");
    let kling26 = Pool::with_model(Product::Video, "kling-2.6");
    let plan = Reconcile::new("")
        .legacy_paths(Vec::<String>::new())
        .new_style("text-to-video", kling3.clone())
        .new_style("text-to-video", kling26.clone())
        .external_id_in("a-1", kling3.clone())
        .external_id_in("b-1", kling26.clone())
        .task_in(ids[2].clone(), kling26.clone());
    let before = mock.stats().requests_total;
    let found = handle.reconcile(&mut bare, &plan).await.unwrap();
    assert_eq!((found.unfinished, found.adopted), (4, 4));
    assert_eq!(
        mock.stats().requests_total - before,
        2,
        "one list per status (submitted, processing), the product once"
    );
    let snapshot = handle.snapshot().await.unwrap();
    let in_use = |pool: &Pool| snapshot.get(&account, pool).map_or(0, |p| p.in_use);
    assert_eq!((in_use(&kling3), in_use(&kling26)), (2, 2));
}

/// A legacy path the server will not list (here one it does not serve: 404 `1202`) is left
/// out, and the other paths' tasks are still adopted; before, the first such refusal ended the
/// whole reconcile with nothing adopted.
#[tokio::test(start_paused = true)]
async fn a_path_the_server_will_not_list_is_skipped_and_the_rest_adopted() {
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .no_rate_limit()
            .task_duration(Duration::from_secs(600), Duration::from_secs(600)),
    )
    .unwrap();
    let mut bare = client(&mock);
    send(
        &mut bare,
        post("/v1/videos/text2video", r#"{"prompt":"a"}"#),
    )
    .await;
    let account = AccountId::new("key");
    let (_layer, handle) =
        TaskSlotsLayer::pair(SlotsConfig::new(5).default_account(account.clone())).unwrap();
    let plan =
        Reconcile::new("").legacy_paths(["/v1/videos/not-served-here", "/v1/videos/text2video"]);
    let found = handle.reconcile(&mut bare, &plan).await.unwrap();
    assert_eq!(
        (found.unfinished, found.adopted, found.skipped_paths),
        (1, 1, 1)
    );
}

/// A list that ran behind a callback: the list request goes out, the task it will name ends
/// and its callback frees its slot, then the list's answer names it running. Before, reconcile
/// adopted the ended task and held its slot until the lease ran out (one create fewer than the
/// account allows, for the lease); now the end, reported while the listing ran, is
/// remembered, and nothing is adopted. A task that runs on is still adopted.
#[tokio::test(start_paused = true)]
async fn a_list_answered_before_a_reported_end_adopts_nothing_for_that_task() {
    use std::future::Future;
    use std::pin::Pin;

    use kling_concurrency::SlotsHandle;
    use serde_json::json;

    use crate::support::{Fake, create, envelope, video};

    let lease = Duration::from_secs(1800);
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2).lease(lease)).unwrap();
    let mut slots = layer.layer(Fake::new());
    send(&mut slots, create()).await;
    assert_eq!(
        handle.snapshot().await.unwrap().pools()[0].in_use,
        1,
        "t1 holds its slot"
    );

    /// Lists t1 (and `other`, another process's task) running, after t1's callback came.
    #[derive(Clone)]
    struct Behind(SlotsHandle);
    type Answer = Result<http::Response<Full<Bytes>>, BoxError>;
    impl Service<Request<Full<Bytes>>> for Behind {
        type Response = http::Response<Full<Bytes>>;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
            let handle = self.0.clone();
            let first = request.uri().query().unwrap().starts_with("pageNum=1&");
            Box::pin(async move {
                if !first {
                    return Ok(envelope(200, 0, &json!([])));
                }
                // The list was asked; t1 ends and its callback comes before the answer.
                let callback = br#"{"task_id":"t1","task_status":"succeed"}"#;
                let applied = handle.on_callback(callback).await.unwrap();
                assert_eq!(applied.released.len(), 1, "the callback frees t1");
                let running = |id: &str| json!({"task_id": id, "task_status": "processing"});
                Ok(envelope(200, 0, &json!([running("t1"), running("other")])))
            })
        }
    }

    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle
        .reconcile(&mut Behind(handle.clone()), &plan)
        .await
        .unwrap();
    assert_eq!((found.unfinished, found.adopted), (2, 1), "`other` only");
    let snapshot = handle.snapshot().await.unwrap();
    let pool = snapshot.get(handle.default_account(), &video()).unwrap();
    assert_eq!(
        (pool.in_use, pool.tasks),
        (1, 1),
        "`other`'s slot, not t1's"
    );
    // One more create runs beside `other`, as the account allows.
    send(&mut slots, create()).await;
    let snapshot = handle.snapshot().await.unwrap();
    let pool = snapshot.get(handle.default_account(), &video()).unwrap();
    assert_eq!((pool.in_use, pool.tasks), (2, 2));
}

/// A list that ran behind an end reported before the reconcile even began: t1 ends and a
/// query frees its slot, and only then does a reconcile list the server's tasks, whose list
/// (the server's index behind) still names t1 running. Before, the in-process backend
/// remembered only the ends reported while a listing ran, and adopted t1, holding its slot
/// until the lease ran out; now every end that frees a holding is remembered (as the Redis
/// backend does), and nothing is adopted for t1. A task that runs on is still adopted.
#[tokio::test(start_paused = true)]
async fn a_list_behind_an_end_reported_before_the_reconcile_adopts_nothing_for_that_task() {
    use serde_json::json;

    use crate::support::{Fake, create, envelope, get, video};

    let lease = Duration::from_secs(1800);
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2).lease(lease)).unwrap();
    let mut slots = layer.layer(fake.clone());
    let created = send(&mut slots, create()).await;
    let t1 = Outcome::of(&created).unwrap().task().unwrap().id.clone();
    fake.finish(&t1);
    send(&mut slots, get(&format!("/v1/videos/text2video/{t1}"))).await;
    let pool = |snapshot: kling_concurrency::Snapshot| {
        let pool = snapshot.get(handle.default_account(), &video()).unwrap();
        (pool.in_use, pool.tasks)
    };
    assert_eq!(pool(handle.snapshot().await.unwrap()), (0, 0), "t1 ended");
    tokio::time::advance(Duration::from_secs(60)).await;

    // The server's list still names t1 running, beside another process's task.
    let running = |id: &str| json!({"task_id": id, "task_status": "processing"});
    let listed = envelope(200, 0, &json!([running(&t1), running("other")]));
    let mut behind = tower::service_fn(move |_: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(listed.clone()))
    });
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut behind, &plan).await.unwrap();
    assert_eq!((found.unfinished, found.adopted), (2, 1), "`other` only");
    assert_eq!(
        pool(handle.snapshot().await.unwrap()),
        (1, 1),
        "`other`'s slot, not t1's"
    );
}

/// The listings a reconcile begins, counted: each one ends, also when the list fails.
#[derive(Clone, Debug)]
struct Counting {
    inner: kling_concurrency::backend::InProcess,
    open: Arc<AtomicI32>,
    begun: Arc<AtomicI32>,
}

impl SlotBackend for Counting {
    type Acquire = <InProcess as SlotBackend>::Acquire;
    type Apply = <InProcess as SlotBackend>::Apply;
    type Snapshot = <InProcess as SlotBackend>::Snapshot;

    fn acquire(&self, key: SlotKey, weight: u32) -> Self::Acquire {
        self.inner.acquire(key, weight)
    }

    fn apply(&self, op: SlotOp) -> Self::Apply {
        self.inner.apply(op)
    }

    fn snapshot(&self) -> Self::Snapshot {
        self.inner.snapshot()
    }

    fn begin_listing(&self) {
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.open.fetch_add(1, Ordering::SeqCst);
    }

    fn end_listing(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A reconcile tells its backend when its listing begins and ends, whether its list is
/// answered or fails.
#[tokio::test(start_paused = true)]
async fn a_reconcile_ends_the_listing_it_began_also_when_its_list_fails() {
    let config = SlotsConfig::new(2);
    let backend = Counting {
        inner: InProcess::new(config.clone()).unwrap(),
        open: Arc::default(),
        begun: Arc::default(),
    };
    let handle = TaskSlotsLayer::with_backend(&config, backend.clone())
        .unwrap()
        .handle();
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let empty = crate::support::envelope(200, 0, &serde_json::json!([]));
    let mut answered = tower::service_fn(move |_: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(empty.clone()))
    });
    handle.reconcile(&mut answered, &plan).await.unwrap();
    let mut failing = tower::service_fn(|_: Request<Full<Bytes>>| async {
        Err::<http::Response<Full<Bytes>>, BoxError>("connection refused".into())
    });
    assert!(handle.reconcile(&mut failing, &plan).await.is_err());
    let counts = (
        backend.begun.load(Ordering::SeqCst),
        backend.open.load(Ordering::SeqCst),
    );
    assert_eq!(counts, (2, 0), "two listings begun, none left open");
}

/// A task a page names running, whose end comes while later pages are listed, followed by
/// more ends than the in-process backend remembers (4096: a busy account's batch of short
/// tasks during a long reconcile). Before, a reconcile listed every path and page first and
/// adopted after: by then the task's end was forgotten, and it was adopted, holding a slot for
/// nothing until its lease ran out (30 minutes; as many slots as such tasks, whatever the
/// pool's capacity). Now each page's tasks are adopted as soon as it is answered, while the
/// task is still held: nothing is adopted for it, and its end frees its slot.
#[tokio::test(start_paused = true)]
async fn a_task_ended_after_its_page_is_not_adopted_however_many_ends_follow() {
    use std::future::Future;
    use std::pin::Pin;

    use kling_concurrency::SlotsHandle;
    use kling_concurrency::backend::TaskRef;
    use serde_json::json;

    use crate::support::{Fake, create, envelope, video};

    let lease = Duration::from_secs(1800);
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2).lease(lease)).unwrap();
    let mut slots = layer.layer(Fake::new());
    let created = send(&mut slots, create()).await;
    let t1 = Outcome::of(&created).unwrap().task().unwrap().id.clone();

    /// Lists `t1` running on the first path; before it answers the second, `t1` ends and so
    /// do 4100 other tasks.
    #[derive(Clone)]
    struct Busy(SlotsHandle, String);
    type Answer = Result<http::Response<Full<Bytes>>, BoxError>;
    impl Service<Request<Full<Bytes>>> for Busy {
        type Response = http::Response<Full<Bytes>>;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
            let (handle, t1) = (self.0.clone(), self.1.clone());
            let first = request.uri().path() == "/v1/videos/text2video";
            Box::pin(async move {
                if first {
                    let running = json!({"task_id": t1, "task_status": "processing"});
                    return Ok(envelope(200, 0, &json!([running])));
                }
                let callback = json!({"task_id": t1, "task_status": "succeed"}).to_string();
                let applied = handle.on_callback(callback.as_bytes()).await.unwrap();
                assert_eq!(applied.released.len(), 1, "the callback frees t1");
                let backend = handle.backend();
                let key = SlotKey::new(handle.default_account().clone(), video());
                for i in 0..4100 {
                    let Ok(Ok(reservation)) = backend.acquire_now(key.clone(), 1) else {
                        panic!("a slot is free");
                    };
                    let id = format!("b{i}");
                    let task = TaskRef {
                        id: Some(id.clone()),
                        external_id: None,
                    };
                    let hold = SlotOp::Hold {
                        reservation,
                        task,
                        lease: Duration::from_secs(1800),
                    };
                    backend.apply(hold).await.unwrap();
                    handle.complete(&id).await.unwrap().unwrap();
                }
                Ok(envelope(200, 0, &json!([])))
            })
        }
    }

    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video", "/v1/videos/image2video"]);
    let found = handle
        .reconcile(&mut Busy(handle.clone(), t1), &plan)
        .await
        .unwrap();
    assert_eq!((found.unfinished, found.adopted), (1, 0), "t1 was held");
    let snapshot = handle.snapshot().await.unwrap();
    let pool = snapshot.get(handle.default_account(), &video()).unwrap();
    assert_eq!((pool.in_use, pool.tasks), (0, 0), "no slot held for t1");
}

/// A legacy list answering each `pageNum` with `pages[pageNum - 1]` (an empty page past
/// them), recording the path each request asks for.
fn legacy_pages(
    pages: Vec<serde_json::Value>,
    asked: Arc<std::sync::Mutex<Vec<String>>>,
) -> impl Service<Request<Full<Bytes>>, Response = http::Response<Full<Bytes>>, Error = BoxError> {
    tower::service_fn(move |request: Request<Full<Bytes>>| {
        asked.lock().unwrap().push(request.uri().path().to_owned());
        let page: usize = request
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("pageNum="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let data = pages
            .get(page - 1)
            .cloned()
            .unwrap_or_else(|| serde_json::json!([]));
        std::future::ready(Ok::<_, BoxError>(crate::support::envelope(200, 0, &data)))
    })
}

fn legacy_task(id: &str, status: &str) -> serde_json::Value {
    serde_json::json!({"task_id": id, "task_status": status})
}

/// A full legacy page (500 entries) of which one does not read as a task: the listing goes on
/// to the next page. Before, it stopped at a page of fewer than 500 *readable* tasks, so the
/// tasks of later pages were never adopted.
#[tokio::test(start_paused = true)]
async fn a_full_page_with_an_unreadable_entry_does_not_end_the_legacy_listing() {
    let mut first: Vec<_> = (0..499)
        .map(|i| legacy_task(&format!("done{i}"), "succeed"))
        .collect();
    first.push(serde_json::json!({"task_status": "processing"}));
    let second = vec![legacy_task("later", "processing")];
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut service = legacy_pages(
        vec![serde_json::json!(first), serde_json::json!(second)],
        asked.clone(),
    );
    let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut service, &plan).await.unwrap();
    assert_eq!(
        (found.unfinished, found.adopted),
        (1, 1),
        "`later` is adopted"
    );
    assert_eq!(asked.lock().unwrap().len(), 2, "page 2 is short: the end");
}

/// A task created while a legacy list is read shifts the pages: the task last on page 1 is
/// first on page 2. It is counted once. Before, `unfinished` counted it twice.
#[tokio::test(start_paused = true)]
async fn a_task_listed_on_two_pages_is_counted_once() {
    let mut first: Vec<_> = (0..499)
        .map(|i| legacy_task(&format!("done{i}"), "succeed"))
        .collect();
    first.push(legacy_task("shifted", "processing"));
    let second = vec![
        legacy_task("shifted", "processing"),
        legacy_task("other", "submitted"),
    ];
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut service = legacy_pages(
        vec![serde_json::json!(first), serde_json::json!(second)],
        asked,
    );
    let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut service, &plan).await.unwrap();
    assert_eq!((found.unfinished, found.adopted), (2, 2));
}

/// A configured legacy path that is no create path known here (a typo, a path newer than this
/// crate) is counted in `skipped_paths`, never asked for; the others are listed. Before, it
/// was left out silently.
#[tokio::test(start_paused = true)]
async fn a_legacy_path_not_known_as_a_create_is_counted_skipped() {
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let page = serde_json::json!([legacy_task("t1", "processing")]);
    let mut service = legacy_pages(vec![page], asked.clone());
    let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    let plan = Reconcile::new("").legacy_paths(["/v1/vidoes/text2video", "/v1/videos/text2video"]);
    let found = handle.reconcile(&mut service, &plan).await.unwrap();
    assert_eq!(
        (found.unfinished, found.adopted, found.skipped_paths),
        (1, 1, 1)
    );
    // Page 1, then page 2 (empty: the end), of the known path only.
    assert_eq!(
        *asked.lock().unwrap(),
        ["/v1/videos/text2video", "/v1/videos/text2video"]
    );
}

/// What the reconcile doc says of an end a batch answer told of a task not held here: it is
/// not remembered (a batch answer or list page names many tasks long ended, which would push
/// the ends that matter out of the bounded memory), so a list running behind adopts the task;
/// its next report frees it. The end of the same task told by a query of it alone is
/// remembered, and nothing is adopted.
#[tokio::test(start_paused = true)]
async fn an_end_a_batch_answer_told_of_a_task_not_held_here_is_not_remembered() {
    use crate::support::video;

    for (batch, adopted) in [(true, 1), (false, 0)] {
        let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
        let account = handle.default_account().clone();
        let mut ended = vec![legacy_task("elsewhere", "succeed")];
        if batch {
            ended.push(legacy_task("another", "failed"));
        }
        let mut answer = crate::support::envelope(200, 0, &serde_json::json!(ended));
        let outcome = Outcome::ensure(&mut answer).unwrap();
        let lease = Duration::from_secs(1800);
        handle
            .backend()
            .observe_unread(&account, &outcome, lease)
            .await
            .unwrap();
        let page = serde_json::json!([legacy_task("elsewhere", "processing")]);
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut service = legacy_pages(vec![page], asked);
        let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
        let found = handle.reconcile(&mut service, &plan).await.unwrap();
        assert_eq!(
            (found.unfinished, found.adopted),
            (1, adopted),
            "batch: {batch}"
        );
        if batch {
            let callback = br#"{"task_id":"elsewhere","task_status":"succeed"}"#;
            handle.on_callback(callback).await.unwrap();
            let snapshot = handle.snapshot().await.unwrap();
            assert_eq!(snapshot.get(&account, &video()).unwrap().in_use, 0);
        }
    }
}

/// A legacy list whose server serves at most `cap` entries a page, whatever `pageSize` asks
/// for, over `tasks` (newest first, as Kling lists); counts the requests.
fn capped_legacy_list(
    tasks: Vec<serde_json::Value>,
    cap: usize,
    asked: Arc<AtomicI32>,
) -> impl Service<Request<Full<Bytes>>, Response = http::Response<Full<Bytes>>, Error = BoxError> {
    tower::service_fn(move |request: Request<Full<Bytes>>| {
        asked.fetch_add(1, Ordering::SeqCst);
        let query = request.uri().query().unwrap_or("").to_owned();
        let number = |key: &str| -> usize {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(key))
                .and_then(|n| n.parse().ok())
                .unwrap()
        };
        let size = number("pageSize=").min(cap);
        let skip = (number("pageNum=") - 1) * size;
        let page: Vec<_> = tasks.iter().skip(skip).take(size).cloned().collect();
        let data = serde_json::Value::Array(page);
        std::future::ready(Ok::<_, BoxError>(crate::support::envelope(200, 0, &data)))
    })
}

/// A server that caps its legacy pages at 100 entries (asked for 500): 250 tasks, the running
/// ones on pages 2 and 3. Before, the first page (100, fewer than the 500 asked for) was taken
/// for the last, the running tasks were never counted, and the limiter admitted creates that
/// met `1303`. Now only an empty page, or one shorter than a page the server already served,
/// ends the listing.
#[tokio::test(start_paused = true)]
async fn a_server_capping_its_legacy_pages_below_the_size_asked_is_listed_to_the_end() {
    let tasks: Vec<_> = (0..250)
        .map(|i| {
            let status = if i >= 150 && i % 10 == 0 {
                "processing"
            } else {
                "succeed"
            };
            legacy_task(&format!("t{i}"), status)
        })
        .collect();
    let asked = Arc::new(AtomicI32::new(0));
    let mut service = capped_legacy_list(tasks, 100, asked.clone());
    let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(20)).unwrap();
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut service, &plan).await.unwrap();
    assert_eq!((found.unfinished, found.adopted), (10, 10), "pages 2 and 3");
    assert_eq!(found.truncated_listings, 0);
    assert_eq!(
        asked.load(Ordering::SeqCst),
        3,
        "page 3 (50) is shorter than page 1 (100): the end"
    );
    let snapshot = handle.snapshot().await.unwrap();
    let in_use = snapshot
        .get(handle.default_account(), &crate::support::video())
        .unwrap()
        .in_use;
    assert_eq!(in_use, 10);
}

/// A short first page is no end by itself (the server's cap may be that short): the next page
/// is asked for, and its emptiness ends the listing.
#[tokio::test(start_paused = true)]
async fn a_short_first_legacy_page_is_followed_by_one_more_request() {
    let tasks = vec![legacy_task("a", "processing"), legacy_task("b", "succeed")];
    let asked = Arc::new(AtomicI32::new(0));
    let mut service = capped_legacy_list(tasks, 500, asked.clone());
    let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut service, &plan).await.unwrap();
    assert_eq!((found.unfinished, found.truncated_listings), (1, 0));
    assert_eq!(asked.load(Ordering::SeqCst), 2, "page 2 is empty: the end");
}

/// A legacy list that never ends (a server serving 2 new running tasks on every page) is read
/// up to the page cap (500 pages), not forever: the reconcile returns what it counted and
/// says the listing was cut short. A server that ignores `pageNum` (the same page each time)
/// ends the listing at its second repeat in a row.
#[tokio::test(start_paused = true)]
async fn a_legacy_list_that_never_ends_stops_at_the_page_cap() {
    let asked = Arc::new(AtomicI32::new(0));
    let counter = asked.clone();
    let mut endless = tower::service_fn(move |_: Request<Full<Bytes>>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let page = serde_json::json!([
            legacy_task(&format!("a{n}"), "processing"),
            legacy_task(&format!("b{n}"), "submitted"),
        ]);
        std::future::ready(Ok::<_, BoxError>(crate::support::envelope(200, 0, &page)))
    });
    let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut endless, &plan).await.unwrap();
    assert_eq!(asked.load(Ordering::SeqCst), 500, "the page cap");
    assert_eq!((found.unfinished, found.truncated_listings), (1000, 1));

    let asked = Arc::new(AtomicI32::new(0));
    let counter = asked.clone();
    let mut repeating = tower::service_fn(move |_: Request<Full<Bytes>>| {
        counter.fetch_add(1, Ordering::SeqCst);
        let page = serde_json::json!([legacy_task("same", "processing")]);
        std::future::ready(Ok::<_, BoxError>(crate::support::envelope(200, 0, &page)))
    });
    let found = handle.reconcile(&mut repeating, &plan).await.unwrap();
    assert_eq!(
        asked.load(Ordering::SeqCst),
        3,
        "pages 2 and 3 repeat page 1 (one repeat alone may be a shifted list)"
    );
    assert_eq!((found.unfinished, found.truncated_listings), (1, 1));
}

/// A new-style list whose cursor never runs out stops at the page cap for each status, and
/// says so.
#[tokio::test(start_paused = true)]
async fn a_new_style_list_whose_cursor_never_ends_stops_at_the_page_cap() {
    let asked = Arc::new(AtomicI32::new(0));
    let counter = asked.clone();
    let mut endless = tower::service_fn(move |_: Request<Full<Bytes>>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let data = serde_json::json!({"tasks": [], "next_cursor": format!("c{n}")});
        std::future::ready(Ok::<_, BoxError>(crate::support::envelope(200, 0, &data)))
    });
    let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    let plan = Reconcile::new("")
        .legacy_paths(Vec::<String>::new())
        .new_style(
            "text-to-video",
            Pool::with_model(Product::Video, "kling-3.0"),
        );
    let found = handle.reconcile(&mut endless, &plan).await.unwrap();
    assert_eq!(asked.load(Ordering::SeqCst), 1000, "500 pages per status");
    assert_eq!(found.truncated_listings, 2);
}

/// A new-style list whose answer hands back the cursor it was sent would give the same page
/// again up to the page cap (1,000 requests for the two statuses): it stops at the first
/// repeat, logged and counted. The negative control: cursors that move on are followed.
#[tokio::test(start_paused = true)]
async fn a_new_style_list_answering_with_the_cursor_it_was_sent_stops_there() {
    // Three pages a status either way: the stuck server's third hands back `b`.
    for (stuck, truncated) in [(true, 2), (false, 0)] {
        let asked = Arc::new(AtomicI32::new(0));
        let counter = asked.clone();
        let mut server = tower::service_fn(move |request: Request<Full<Bytes>>| {
            use http_body_util::BodyExt;
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                // Pages `a`, then `b`; a stuck server answers `b` with `b` for ever, the
                // other ends there.
                let next = match body["cursor"].as_str() {
                    None => Some("a"),
                    Some("a") => Some("b"),
                    Some(_) if stuck => Some("b"),
                    Some(_) => None,
                };
                let data = serde_json::json!({"tasks": [], "next_cursor": next});
                Ok::<_, BoxError>(crate::support::envelope(200, 0, &data))
            }
        });
        let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
        let plan = Reconcile::new("")
            .legacy_paths(Vec::<String>::new())
            .new_style(
                "text-to-video",
                Pool::with_model(Product::Video, "kling-3.0"),
            );
        let found = handle.reconcile(&mut server, &plan).await.unwrap();
        assert_eq!(asked.load(Ordering::SeqCst), 6, "stuck: {stuck}");
        assert_eq!(found.truncated_listings, truncated, "stuck: {stuck}");
    }
}

/// A new-style task moves from `submitted` to `processing` between the reconcile's list of
/// `submitted` tasks and its list of `processing` ones. A task only moves forward, so listing
/// `submitted` first cannot miss it: before that list it is `processing` at the later list
/// too; after it, the `submitted` list named it. (Listed the other way round, it would be
/// `submitted` at the `processing` list and `processing` at the `submitted` list: named by
/// neither, its slot uncounted until `1303`s corrected the pool.) The negative control: a task
/// that stays `submitted` and one already `processing` are counted too.
#[tokio::test(start_paused = true)]
async fn a_task_moving_forward_between_the_two_status_lists_is_counted() {
    let lists = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = lists.clone();
    let mut server = tower::service_fn(move |request: Request<Full<Bytes>>| {
        use http_body_util::BodyExt;
        let seen = seen.clone();
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let status = body["status"].as_str().unwrap().to_owned();
            let mut lists = seen.lock().unwrap();
            // `moving` is `submitted` until the first list is answered, `processing` after.
            let moving = if lists.is_empty() {
                "submitted"
            } else {
                "processing"
            };
            lists.push(status.clone());
            let tasks: Vec<_> = [
                ("moving", moving),
                ("waiting", "submitted"),
                ("running", "processing"),
            ]
            .into_iter()
            .filter(|(_, s)| *s == status)
            .map(|(id, s)| serde_json::json!({"id": id, "status": s}))
            .collect();
            let data = serde_json::json!({"tasks": tasks, "next_cursor": null});
            Ok::<_, BoxError>(crate::support::envelope(200, 0, &data))
        }
    });
    let kling3 = Pool::with_model(Product::Video, "kling-3.0");
    let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    let plan = Reconcile::new("")
        .legacy_paths(Vec::<String>::new())
        .new_style("text-to-video", kling3.clone());
    let found = handle.reconcile(&mut server, &plan).await.unwrap();
    assert_eq!(lists.lock().unwrap().len(), 2, "one list per status");
    assert_eq!((found.unfinished, found.adopted), (3, 3));
    let snapshot = handle.snapshot().await.unwrap();
    let in_use = snapshot
        .get(handle.default_account(), &kling3)
        .unwrap()
        .in_use;
    assert_eq!(in_use, 3, "moving, waiting and running each hold a slot");
}

/// A server capping its legacy pages at 2 entries, while another process creates 2 tasks
/// between the reconcile's requests for pages 1 and 2: the list, newest first, shifts by
/// exactly a page, and page 2 names the tasks page 1 named. That is no server ignoring
/// `pageNum`: pages 3 and 4 hold the running tasks. Before, a page repeating the one before
/// ended the listing at once (counted truncated): those tasks were never counted, and the
/// limiter admitted creates that met `1303`. A server that does ignore `pageNum` serves the
/// same page a third time, and only that ends the listing (the negative control, in
/// `a_legacy_list_that_never_ends_stops_at_the_page_cap`).
#[tokio::test(start_paused = true)]
async fn a_legacy_page_repeated_by_a_page_of_creates_between_two_requests_does_not_end_it() {
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            legacy_task(
                &format!("t{i}"),
                if i < 2 { "succeed" } else { "processing" },
            )
        })
        .collect();
    let tasks = Arc::new(std::sync::Mutex::new(tasks));
    let asked = Arc::new(AtomicI32::new(0));
    let (listed, counter) = (tasks.clone(), asked.clone());
    let mut shifting = tower::service_fn(move |_: Request<Full<Bytes>>| {
        let n = counter.fetch_add(1, Ordering::SeqCst) as usize;
        let mut tasks = listed.lock().unwrap();
        if n == 1 {
            // Two creates, listed first, before page 2 is answered.
            for id in ["new0", "new1"] {
                tasks.insert(0, legacy_task(id, "submitted"));
            }
        }
        let page: Vec<_> = tasks.iter().skip(n * 2).take(2).cloned().collect();
        let data = serde_json::Value::Array(page);
        std::future::ready(Ok::<_, BoxError>(crate::support::envelope(200, 0, &data)))
    });
    let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(20)).unwrap();
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut shifting, &plan).await.unwrap();
    assert_eq!(
        (found.unfinished, found.truncated_listings),
        (4, 0),
        "t2 to t5, on pages 3 and 4"
    );
    assert_eq!(asked.load(Ordering::SeqCst), 5, "page 5 is empty: the end");
}

/// A server that ignores `pageNum` and serves a page whose entries do not read as tasks (no
/// task id): its repeats are told by the entries themselves, not by task ids it has none of.
/// Before, such a page never counted as a repeat, and each reconcile asked for it 500 times
/// (the page cap) on every legacy path; when a short page still ended a listing, once. The
/// negative control: pages of unreadable entries that differ are read on.
#[tokio::test(start_paused = true)]
async fn a_repeated_legacy_page_of_unreadable_entries_ends_the_listing() {
    let asked = Arc::new(AtomicI32::new(0));
    let counter = asked.clone();
    let mut repeating = tower::service_fn(move |_: Request<Full<Bytes>>| {
        counter.fetch_add(1, Ordering::SeqCst);
        let page = serde_json::json!([{"task_status": "processing"}]);
        std::future::ready(Ok::<_, BoxError>(crate::support::envelope(200, 0, &page)))
    });
    let (_layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut repeating, &plan).await.unwrap();
    assert_eq!(
        asked.load(Ordering::SeqCst),
        3,
        "pages 2 and 3 repeat page 1"
    );
    assert_eq!((found.unfinished, found.truncated_listings), (0, 1));

    let asked = Arc::new(AtomicI32::new(0));
    let counter = asked.clone();
    let mut differing = tower::service_fn(move |_: Request<Full<Bytes>>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let page = match n {
            0..3 => serde_json::json!([{"task_status": "processing", "n": n}]),
            _ => serde_json::json!([]),
        };
        std::future::ready(Ok::<_, BoxError>(crate::support::envelope(200, 0, &page)))
    });
    let found = handle.reconcile(&mut differing, &plan).await.unwrap();
    assert_eq!(asked.load(Ordering::SeqCst), 4, "page 4 is empty: the end");
    assert_eq!(found.truncated_listings, 0);
}

/// A reconcile's list that names a task held here as ended frees its slot, as a list sent
/// through the layer does, also when the reconcile lists with the bare client (its answers
/// never pass the layer): a process that missed the task's callback, or a backend that kept
/// holdings across a restart, would otherwise hold the slot until the lease ran out. A list
/// that names it running keeps it (the negative control), and the end frees it once.
#[tokio::test(start_paused = true)]
async fn a_reconcile_listing_a_held_task_as_ended_frees_its_slot() {
    let minute = Duration::from_secs(60);
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .no_rate_limit()
            .task_duration(5 * minute, 5 * minute),
    )
    .unwrap();
    let account = AccountId::new("key");
    let (layer, handle) =
        TaskSlotsLayer::pair(SlotsConfig::new(5).default_account(account.clone())).unwrap();
    let mut slots = layer.layer(client(&mock));
    let answer = send(
        &mut slots,
        post("/v1/videos/text2video", r#"{"prompt":"held"}"#),
    )
    .await;
    assert!(Outcome::of(&answer).unwrap().is_success());
    let video = Pool::new(Product::Video);
    let in_use = |handle: kling_concurrency::SlotsHandle| {
        let (account, video) = (account.clone(), video.clone());
        async move {
            let snapshot = handle.snapshot().await.unwrap();
            snapshot.get(&account, &video).unwrap().in_use
        }
    };
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let mut bare = client(&mock);

    let running = handle.reconcile(&mut bare, &plan).await.unwrap();
    assert_eq!((running.unfinished, running.adopted), (1, 0));
    assert_eq!(in_use(handle.clone()).await, 1, "listed running: kept");

    tokio::time::advance(6 * minute).await;
    let ended = handle.reconcile(&mut bare, &plan).await.unwrap();
    assert_eq!((ended.unfinished, ended.adopted), (0, 0));
    assert_eq!(in_use(handle.clone()).await, 0, "listed ended: freed");
    // Listed ended again: nothing more is freed.
    handle.reconcile(&mut bare, &plan).await.unwrap();
    assert_eq!(in_use(handle.clone()).await, 0);
}

/// A reconcile whose list fails part way (a reset on a later page) says which listing and
/// page failed and what it had adopted by then, and keeps those tasks held; the cause stays
/// in its source chain (a caller that reads the `ApiError` of a refusal still finds it).
#[tokio::test(start_paused = true)]
async fn a_listing_that_fails_part_way_says_where_and_keeps_what_it_adopted() {
    let handle = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap().1;
    let running = serde_json::json!([
        legacy_task("a", "processing"),
        legacy_task("b", "submitted")
    ]);
    let mut service = tower::service_fn(move |request: Request<Full<Bytes>>| {
        let first = request.uri().query().unwrap_or("").contains("pageNum=1&");
        let answer = match first {
            true => Ok(crate::support::envelope(200, 0, &running)),
            false => Err::<_, BoxError>("connection reset by peer".into()),
        };
        std::future::ready(answer)
    });
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let err = handle.reconcile(&mut service, &plan).await.unwrap_err();
    let text = err.to_string();
    for part in [
        "page 2",
        "/v1/videos/text2video",
        "2 task(s) adopted",
        "connection reset by peer",
    ] {
        assert!(text.contains(part), "{part:?} in {text}");
    }
    let failed = err
        .downcast_ref::<kling_concurrency::error::ReconcileFailed>()
        .expect("typed error");
    assert_eq!(failed.page(), Some(2));
    assert_eq!(failed.so_far().adopted, 2);
    let cause = std::error::Error::source(failed).expect("its cause");
    assert_eq!(cause.to_string(), "connection reset by peer");
    let snapshot = handle.snapshot().await.unwrap();
    let video = snapshot
        .get(handle.default_account(), &Pool::new(Product::Video))
        .unwrap();
    assert_eq!(video.in_use, 2, "what was adopted stays held");
}

/// A reconcile's last legacy page often holds a single entry, a task long ended (legacy lists
/// keep ended tasks for 30 days). Its end is no news: it must not be remembered as an end
/// that overtook a create's answer, or a later create under the same external id on another
/// path (allowed: external ids may be unique per create path only), whose answer is lost, is
/// released at once while its task runs. A page of two such entries (the negative control
/// of the rule "a report of one task is remembered") never did this.
#[tokio::test(start_paused = true)]
async fn a_one_entry_list_page_of_an_ended_task_frees_no_later_create_under_its_external_id() {
    for entries in [2, 1] {
        let fake = crate::support::Fake::new();
        let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
        let mut slots = layer.layer(fake.clone());
        let mut page: Vec<_> = (0..entries)
            .map(|i| {
                serde_json::json!({
                    "task_id": format!("old-image-{i}"),
                    "task_status": "succeed",
                    "task_info": {"external_task_id": format!("job-{i}")},
                })
            })
            .collect();
        page.reverse();
        let mut images = legacy_pages(
            vec![serde_json::json!(page)],
            Arc::new(std::sync::Mutex::new(Vec::new())),
        );
        let plan = Reconcile::new("").legacy_paths(["/v1/images/generations"]);
        let found = handle.reconcile(&mut images, &plan).await.unwrap();
        assert_eq!((found.unfinished, found.adopted), (0, 0));

        // A video create under `job-0`, its answer lost: it may run, so it keeps its slot.
        fake.script(crate::support::Scripted::Lost);
        let video = crate::support::create_with_external("job-0");
        assert!(slots.ready().await.unwrap().call(video).await.is_err());
        let in_use = crate::support::pool_state(&handle, &crate::support::video()).await;
        assert_eq!(
            in_use.0, 1,
            "a page of {entries} entries freed a later create"
        );
    }
}

/// As above, for a list sent through the layer (kling-batch reconciles through its stack, so
/// the layer reads every page before the reconcile does): a one-entry page naming a task long
/// ended is not remembered either. A page naming it alone through a query (a report of one
/// task, which may overtake its create's answer) still is (the negative control).
#[tokio::test(start_paused = true)]
async fn a_one_entry_list_page_through_the_layer_frees_no_later_create_under_its_external_id() {
    for (request, freed) in [
        ("/v1/images/generations/old-image", true),
        ("/v1/images/generations?pageNum=1&pageSize=500", false),
    ] {
        let fake = crate::support::Fake::new();
        let lists = fake.clone();
        let server = tower::service_fn(move |request: Request<Full<Bytes>>| {
            let entry = serde_json::json!({
                "task_id": "old-image",
                "task_status": "succeed",
                "task_info": {"external_task_id": "job-0"},
            });
            let answer = match request.uri().path().starts_with("/v1/images/") {
                true if request.uri().query().is_some() => Ok(crate::support::envelope(
                    200,
                    0,
                    &serde_json::json!([entry]),
                )),
                true => Ok(crate::support::envelope(200, 0, &entry)),
                false => lists.clone().call(request).into_inner(),
            };
            std::future::ready(answer)
        });
        let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
        let mut slots = layer.layer(server);
        send(&mut slots, crate::support::get(request)).await;

        fake.script(crate::support::Scripted::Lost);
        let video = crate::support::create_with_external("job-0");
        assert!(slots.ready().await.unwrap().call(video).await.is_err());
        let in_use = crate::support::pool_state(&handle, &crate::support::video()).await;
        assert_eq!(in_use.0, u32::from(!freed), "after {request}");
    }
}

/// Counts the finished-task metrics: `kling_tasks_finished_total` increments and
/// `kling_task_lifetime_seconds` records.
#[derive(Default)]
struct FinishedCount {
    finished: Arc<std::sync::atomic::AtomicU64>,
    lifetimes: Arc<std::sync::atomic::AtomicU64>,
}

struct Adds(Arc<std::sync::atomic::AtomicU64>);

impl metrics::CounterFn for Adds {
    fn increment(&self, n: u64) {
        self.0.fetch_add(n, Ordering::SeqCst);
    }
    fn absolute(&self, _: u64) {}
}

impl metrics::HistogramFn for Adds {
    fn record(&self, _: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl metrics::Recorder for FinishedCount {
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
        match key.name() == kling_core::metrics::TASKS_FINISHED {
            true => metrics::Counter::from_arc(Arc::new(Adds(self.finished.clone()))),
            false => metrics::Counter::noop(),
        }
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        match key.name() == kling_core::metrics::TASK_LIFETIME {
            true => metrics::Histogram::from_arc(Arc::new(Adds(self.lifetimes.clone()))),
            false => metrics::Histogram::noop(),
        }
    }
}

/// A reconcile that lists through the layer has each page applied twice (the layer reads the
/// answer, then the reconcile applies it): a held task the page names ended is released, and
/// counted finished, once. (Counted at all: the recorder sees the release.)
#[tokio::test(start_paused = true)]
async fn a_reconcile_through_the_layer_counts_a_listed_end_once() {
    let recorder = FinishedCount::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let minute = Duration::from_secs(60);
    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .no_rate_limit()
            .task_duration(5 * minute, 5 * minute),
    )
    .unwrap();
    let account = AccountId::new("key");
    let (layer, handle) =
        TaskSlotsLayer::pair(SlotsConfig::new(5).default_account(account.clone())).unwrap();
    let mut slots = layer.layer(client(&mock));
    send(
        &mut slots,
        post("/v1/videos/text2video", r#"{"prompt":"a"}"#),
    )
    .await;
    tokio::time::advance(6 * minute).await;
    let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    for _ in 0..2 {
        handle.reconcile(&mut slots, &plan).await.unwrap();
    }
    let snapshot = handle.snapshot().await.unwrap();
    let video = snapshot.get(&account, &Pool::new(Product::Video)).unwrap();
    assert_eq!(video.in_use, 0);
    assert_eq!(recorder.finished.load(Ordering::SeqCst), 1, "finished");
    assert_eq!(recorder.lifetimes.load(Ordering::SeqCst), 1, "lifetimes");
}

/// A listed task's id is looked up as a task id only: an entry naming as ended a task whose id
/// is the external id a create of unknown outcome is held under (another task: external ids
/// are the caller's, any text) frees nothing. The same entry carrying that external id is that
/// create's task, and frees it (the negative control).
#[tokio::test(start_paused = true)]
async fn a_listed_end_whose_task_id_is_a_held_external_id_frees_nothing() {
    for (entry, freed) in [
        (
            serde_json::json!({"task_id": "e-7", "task_status": "succeed"}),
            false,
        ),
        (
            serde_json::json!({
                "task_id": "t-70",
                "task_status": "succeed",
                "task_info": {"external_task_id": "e-7"},
            }),
            true,
        ),
    ] {
        let fake = crate::support::Fake::new();
        let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
        let mut slots = layer.layer(fake.clone());
        fake.script(crate::support::Scripted::Lost);
        let video = crate::support::create_with_external("e-7");
        assert!(slots.ready().await.unwrap().call(video).await.is_err());

        let mut list = legacy_pages(
            vec![serde_json::json!([entry])],
            Arc::new(std::sync::Mutex::new(Vec::new())),
        );
        let plan = Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
        handle.reconcile(&mut list, &plan).await.unwrap();
        let in_use = crate::support::pool_state(&handle, &crate::support::video()).await;
        assert_eq!(in_use.0, u32::from(!freed), "after {entry}");
    }
}

/// A single-task query is a report of that task only when it is answered as one: a legacy
/// query (`GET {create path}/{id}`) answered with a list (`data` an array, as a server that
/// merges the slashes of `{create path}/x//..` reads it) names tasks long ended like any list
/// page, and the one it names alone frees no later create under its external id. Answered
/// with the task itself (the negative control), and a new-style batch query of one id (whose
/// answer is always an array), each is a report of that task, remembered. So is the answer to
/// a path every server reads as written, whatever its shape: only a path a server may read
/// otherwise has its answer's shape read again (a read of the body each query's last answer
/// would otherwise pay).
#[tokio::test(start_paused = true)]
async fn a_query_answered_with_a_list_frees_no_later_create_under_its_external_id() {
    let legacy = serde_json::json!({
        "task_id": "old-image",
        "task_status": "succeed",
        "task_info": {"external_task_id": "job-0"},
    });
    let new_style = serde_json::json!({
        "id": "old-image",
        "status": "succeeded",
        "external_id": "job-0",
    });
    for (request, data, freed) in [
        ("/v1/images/generations/old-image", legacy.clone(), true),
        (
            "/v1/images/generations/old-image",
            serde_json::json!([legacy.clone()]),
            true,
        ),
        (
            "/v1/images/generations/old-image//..",
            serde_json::json!([legacy]),
            false,
        ),
        (
            "/tasks?task_ids=old-image",
            serde_json::json!([new_style]),
            true,
        ),
    ] {
        let fake = crate::support::Fake::new();
        let creates = fake.clone();
        let answer = data.clone();
        let server = tower::service_fn(move |request: Request<Full<Bytes>>| {
            let answer = match request.method() == http::Method::GET {
                true => Ok(crate::support::envelope(200, 0, &answer)),
                false => creates.clone().call(request).into_inner(),
            };
            std::future::ready(answer)
        });
        let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(5)).unwrap();
        let mut slots = layer.layer(server);
        send(&mut slots, crate::support::get(request)).await;

        fake.script(crate::support::Scripted::Lost);
        let video = crate::support::create_with_external("job-0");
        assert!(slots.ready().await.unwrap().call(video).await.is_err());
        let in_use = crate::support::pool_state(&handle, &crate::support::video()).await;
        assert_eq!(
            in_use.0,
            u32::from(!freed),
            "after {request} answered {data}"
        );
    }
}
