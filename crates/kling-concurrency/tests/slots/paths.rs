//! One external id on two create paths: external ids may be unique per create path only (the
//! mock's rule; a legacy task is looked up at `{create path}/{external id}`), and a callback or
//! `complete` names no path. A report found by its external id alone never frees the slot of
//! another path's task.

use std::time::Duration;

use kling_concurrency::backend::{
    InProcess, InProcessAcquire, ReportPath, SlotBackend, SlotKey, SlotOp,
};
use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
use kling_core::{AccountId, Envelope, Outcome, Pool, Product};
use tokio::time::advance;
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};

use crate::support::*;

fn image() -> Pool {
    Pool::new(Product::Image)
}

/// A legacy image create with an external id.
fn image_with_external(external: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    post(
        "/v1/images/generations",
        &format!(r#"{{"prompt":"a cat","external_task_id":"{external}"}}"#),
    )
}

/// A legacy callback body: task `id` succeeded, created with `external`.
fn callback(id: &str, external: &str) -> Vec<u8> {
    format!(
        r#"{{"task_id":"{id}","task_status":"succeed","task_info":{{"external_task_id":"{external}"}}}}"#
    )
    .into_bytes()
}

/// The brief's case: a video create held under `job-7` (answered, its task id known) and an
/// image task of the same account created with `job-7` too. The image's callback (after its
/// query freed its slot, so its task id is known nowhere) no longer frees the running video's
/// slot, neither delivered as a body nor fed as a parsed report: one create more would meet a
/// `1303`. The video's own callback frees it.
#[tokio::test(start_paused = true)]
async fn a_callback_for_another_paths_task_under_the_same_external_id_frees_no_slot() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(fake.clone());
    svc.ready().await.unwrap();
    svc.call(create_with_external("job-7")).await.unwrap(); // t1
    svc.ready().await.unwrap();
    svc.call(image_with_external("job-7")).await.unwrap(); // t2
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
    assert_eq!(pool_state(&handle, &image()).await.0, 1);

    // The image ends; its query frees its slot.
    fake.finish("t2");
    svc.ready().await.unwrap();
    svc.call(get("/v1/images/generations/t2")).await.unwrap();
    assert_eq!(pool_state(&handle, &image()).await.0, 0);

    // Its callback comes after.
    let applied = handle.on_callback(&callback("t2", "job-7")).await.unwrap();
    assert!(applied.released.is_empty(), "{applied:?}");
    assert_eq!(pool_state(&handle, &video()).await.0, 1, "the video runs");
    let report = Envelope::parse_callback(&callback("t2", "job-7")).unwrap();
    let account = handle.default_account().clone();
    let applied = handle.report_in(&account, &report[0]).await.unwrap();
    assert!(applied.released.is_empty(), "{applied:?}");
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    // So the next video create waits for the video's slot.
    svc.ready().await.unwrap();
    let mut next = spawn(svc.call(create()));
    assert_pending!(next.poll());

    // The video's own callback frees it, and the next create goes.
    let applied = handle.on_callback(&callback("t1", "job-7")).await.unwrap();
    assert_eq!(applied.released.len(), 1);
    assert_eq!(applied.released[0].task.as_deref(), Some("t1"));
    assert!(next.is_woken());
    assert_ready_ok!(next.poll());
    assert_eq!(fake.creates(), 3);
}

/// A callback for another path's task under `job-7` that comes before this path's create
/// (remembered as ended, by its task id and its external id, in case its own create's answer
/// is still on the way) does not free the create answered later with another task id under
/// `job-7`.
#[tokio::test(start_paused = true)]
async fn an_earlier_callback_for_another_task_under_the_same_external_id_frees_no_later_create() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(fake.clone());
    let applied = handle.on_callback(&callback("t9", "job-7")).await.unwrap();
    assert!(!applied.changed);
    svc.ready().await.unwrap();
    svc.call(create_with_external("job-7")).await.unwrap(); // t1
    assert_eq!(pool_state(&handle, &video()).await.0, 1, "t1 runs");
    let applied = handle.on_callback(&callback("t1", "job-7")).await.unwrap();
    assert_eq!(applied.released.len(), 1);
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
}

/// `complete` by an external id two running tasks of the account were created with (on two
/// paths) cannot tell which one ended, and frees neither; once one has ended by its task id,
/// the external id names the other alone.
#[tokio::test(start_paused = true)]
async fn complete_by_an_external_id_two_paths_share_frees_neither() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(fake.clone());
    svc.ready().await.unwrap();
    svc.call(create_with_external("job-7")).await.unwrap(); // t1
    svc.ready().await.unwrap();
    svc.call(image_with_external("job-7")).await.unwrap(); // t2
    assert_eq!(handle.complete("job-7").await.unwrap(), None);
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
    assert_eq!(pool_state(&handle, &image()).await.0, 1);

    fake.finish("t2");
    svc.ready().await.unwrap();
    svc.call(get("/v1/images/generations/t2")).await.unwrap();
    assert_eq!(pool_state(&handle, &image()).await.0, 0);
    let released = handle.complete("job-7").await.unwrap().expect("t1's");
    assert_eq!(released.task.as_deref(), Some("t1"));
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
}

/// Two creates of unknown outcome under `job-7`, a video and an image: the image's is no
/// "video create sent again", so the video's slot stays held (the video may run); a callback
/// naming `job-7` with a task id held nowhere may be either's, and frees neither. The image
/// create sent again and answered replaces the image's earlier holding only; the video's waits
/// for its lease.
#[tokio::test(start_paused = true)]
async fn creates_of_unknown_outcome_on_two_paths_under_one_external_id_keep_their_slots() {
    let fake = Fake::new();
    let lease = Duration::from_secs(600);
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2).lease(lease)).unwrap();
    let mut svc = layer.layer(fake.clone());
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(create_with_external("job-7")).await.is_err());
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(image_with_external("job-7")).await.is_err());
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "the video may run"
    );
    assert_eq!(pool_state(&handle, &image()).await.0, 1);

    let applied = handle.on_callback(&callback("t5", "job-7")).await.unwrap();
    assert!(applied.released.is_empty(), "{applied:?}");
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
    assert_eq!(pool_state(&handle, &image()).await.0, 1);

    svc.ready().await.unwrap();
    svc.call(image_with_external("job-7")).await.unwrap(); // t1
    assert_eq!(
        pool_state(&handle, &image()).await.0,
        1,
        "t1 in place of the lost one"
    );
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
    advance(lease).await;
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
}

/// Creates of unknown outcome under `job-7` on two paths, the image pool full: a lookup at
/// `/v1/images/generations/job-7` that finds nothing gives the image create's slot back (the
/// image create sent again goes), and says nothing of the video create's, sent elsewhere.
#[tokio::test(start_paused = true)]
async fn a_lookup_that_finds_nothing_frees_the_create_of_its_own_path_only() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(fake.clone());
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(create_with_external("job-7")).await.is_err());
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(image_with_external("job-7")).await.is_err());
    svc.ready().await.unwrap();
    let mut again = spawn(svc.call(image_with_external("job-7")));
    assert_pending!(again.poll());

    svc.ready().await.unwrap();
    let lookup = svc.call(get("/v1/images/generations/job-7")).await.unwrap();
    assert_eq!(lookup.status(), 404);
    assert!(again.is_woken());
    assert_ready_ok!(again.poll());
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "the video may run"
    );
    assert_eq!(
        pool_state(&handle, &image()).await.0,
        1,
        "the image sent again"
    );
}

/// An image create answered `5000` (its task made) and a video create lost, both under
/// `job-7`: the image path's lookup by `job-7` reports the image task running, which gives its
/// task id to the image create's holding (not the video's), so the image's callback then ends
/// it by task id; the video's slot stays held.
#[tokio::test(start_paused = true)]
async fn a_lookup_names_its_task_to_the_create_of_its_own_path_only() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(fake.clone());
    fake.script(Scripted::Ghost);
    svc.ready().await.unwrap();
    let ghost = svc.call(image_with_external("job-7")).await.unwrap();
    assert_eq!(ghost.status(), 500);
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(create_with_external("job-7")).await.is_err());
    assert_eq!(pool_state(&handle, &image()).await.0, 1);
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    svc.ready().await.unwrap();
    let lookup = svc.call(get("/v1/images/generations/job-7")).await.unwrap();
    assert_eq!(lookup.status(), 200);
    let applied = handle.on_callback(&callback("t1", "job-7")).await.unwrap();
    assert_eq!(applied.released.len(), 1, "{applied:?}");
    assert_eq!(pool_state(&handle, &image()).await.0, 0);
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "the video may run"
    );
}

/// Two paths of one pool (`text2video` and `image2video`, both `video`): a create of unknown
/// outcome under `job-7` on one is no earlier attempt of the other's under `job-7`, and keeps
/// its slot; a lookup on one path that finds nothing frees that path's create only.
#[tokio::test(start_paused = true)]
async fn creates_on_two_paths_of_one_pool_under_one_external_id_are_two_tasks() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc = layer.layer(fake.clone());
    let image2video = post(
        "/v1/videos/image2video",
        r#"{"image":"x","external_task_id":"job-7"}"#,
    );
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(create_with_external("job-7")).await.is_err());
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(image2video).await.is_err());
    assert_eq!(pool_state(&handle, &video()).await.0, 2);

    svc.ready().await.unwrap();
    svc.call(get("/v1/videos/text2video/job-7")).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
    svc.ready().await.unwrap();
    svc.call(get("/v1/videos/text2video/job-7")).await.unwrap();
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "image2video's stays"
    );
    svc.ready().await.unwrap();
    svc.call(get("/v1/videos/image2video/job-7")).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
}

/// A create that waited for its slot is kept under its own path too: granted once the
/// `text2video` create's slot came back, then lost, the `image2video` create under `job-7` is
/// not freed by `text2video`'s lookup of `job-7`, only by its own path's.
#[tokio::test(start_paused = true)]
async fn a_create_that_waited_is_kept_under_its_own_path() {
    let fake = Fake::new();
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let mut svc = layer.layer(fake.clone());
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    assert!(svc.call(create_with_external("job-7")).await.is_err());
    svc.ready().await.unwrap();
    let mut waiting = spawn(svc.call(post(
        "/v1/videos/image2video",
        r#"{"image":"x","external_task_id":"job-7"}"#,
    )));
    assert_pending!(waiting.poll());
    fake.script(Scripted::Lost);
    svc.ready().await.unwrap();
    svc.call(get("/v1/videos/text2video/job-7")).await.unwrap();
    assert!(waiting.is_woken());
    match waiting.poll() {
        std::task::Poll::Ready(result) => assert!(result.is_err(), "lost"),
        std::task::Poll::Pending => panic!("granted and sent"),
    }
    assert_eq!(pool_state(&handle, &video()).await.0, 1);

    svc.ready().await.unwrap();
    svc.call(get("/v1/videos/text2video/job-7")).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await.0, 1, "not text2video's");
    svc.ready().await.unwrap();
    svc.call(get("/v1/videos/image2video/job-7")).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
}

/// A legacy create path written another way that kling-core (and the server it reads as)
/// routes alike is one create path: a create of unknown outcome under `job-7` sent to
/// `text2video;jsessionid=1` is freed by a lookup of `job-7` at `text2video` that finds
/// nothing, and one sent to `text2video` by a lookup written with parameters, `//`, `%2F`s or
/// dot segments. Keyed by the path's text, each was another path's, and the slot was held to
/// its lease. A lookup on another endpoint written so still frees nothing.
#[tokio::test(start_paused = true)]
async fn a_create_path_written_another_way_is_the_same_path() {
    for (create, lookup) in [
        (
            "/v1/videos/text2video;jsessionid=1",
            "/v1/videos/text2video/job-7",
        ),
        ("/v1;a=b/videos/text2video/", "/v1/videos/text2video/job-7"),
        ("/v1/videos/text2video/;x", "/v1/videos/text2video/job-7"),
        ("//v1/videos//text2video", "/v1/videos/text2video/job-7"),
        ("/v1/videos%2Ftext2video", "/v1/videos/text2video/job-7"),
        ("/v1/videos/x/..;/text2video", "/v1/videos/text2video/job-7"),
        (
            "/v1/videos/text2video",
            "/v1/videos/text2video;jsessionid=1/job-7",
        ),
        ("/v1/videos/text2video", "/v1/videos/text2video/job-7;x"),
        ("/v1/videos/text2video", "/v1/videos/text2video/job-7/;x"),
        ("/v1/videos/text2video", "/v1/videos//text2video//job-7"),
        ("/v1/videos/text2video", "/v1%2Fvideos%2Ftext2video/job-7"),
        ("/v1/videos/text2video", "/v1/videos/x/../text2video/job-7"),
    ] {
        let fake = Fake::new();
        let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
        let mut svc = layer.layer(fake.clone());
        fake.script(Scripted::Lost);
        svc.ready().await.unwrap();
        let sent = post(create, r#"{"prompt":"a cat","external_task_id":"job-7"}"#);
        assert!(svc.call(sent).await.is_err(), "{create}");
        assert_eq!(pool_state(&handle, &video()).await.0, 1, "{create}: held");

        // Another endpoint's lookup, written the same way, is another path's.
        let other = lookup.replace("text2video", "image2video");
        svc.ready().await.unwrap();
        svc.call(get(&other)).await.unwrap();
        assert_eq!(pool_state(&handle, &video()).await.0, 1, "{other}");

        svc.ready().await.unwrap();
        svc.call(get(lookup)).await.unwrap();
        assert_eq!(
            pool_state(&handle, &video()).await.0,
            0,
            "{create}, then {lookup}: the lookup found nothing"
        );
    }
}

/// A legacy list (`GET {create path}?pageNum=…`, a reconcile's through the stack, or the
/// caller's) is of its own create path's tasks: an image list naming an ended task under
/// `job-7` does not free a video create of unknown outcome held under `job-7`. Before, a list's
/// reports were read as of an unknown path, and found the video's holding by external id.
#[tokio::test(start_paused = true)]
async fn a_legacy_list_frees_no_create_of_another_path_by_external_id() {
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let below = tower::service_fn(|req: http::Request<http_body_util::Full<bytes::Bytes>>| {
        let answer: Result<_, kling_core::error::BoxError> = if req.method() == http::Method::POST {
            Err(Box::new(kling_core::error::Transport::after_sent("reset")))
        } else {
            let task = serde_json::json!({"task_id": "t9", "task_status": "succeed",
                "task_info": {"external_task_id": "job-7"}});
            Ok(envelope(200, 0, &serde_json::json!([task])))
        };
        std::future::ready(answer)
    });
    let mut svc = layer.layer(below);
    svc.ready().await.unwrap();
    assert!(svc.call(create_with_external("job-7")).await.is_err());
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "may have made a task"
    );

    svc.ready().await.unwrap();
    let list = get("/v1/images/generations?pageNum=1&pageSize=500");
    assert_eq!(svc.call(list).await.unwrap().status(), 200);
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "the video may run"
    );

    // Its own path's list frees it.
    svc.ready().await.unwrap();
    let list = get("/v1/videos/text2video?pageNum=1&pageSize=500");
    assert_eq!(svc.call(list).await.unwrap().status(), 200);
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
}

/// A reconcile that lists a video task created under `job-7` while an image create of the
/// same account under `job-7` is of unknown outcome (its answer lost) adopts the video task
/// into the video pool: the image create is another path's (external ids may be unique per
/// create path only), in another pool. Before, the image's holding took the video task's id
/// and nothing was adopted: the video pool counted a slot too few (one create more met a
/// `1303`), and the video's end freed the image create's slot while it may run.
#[tokio::test(start_paused = true)]
async fn a_reconcile_adopts_a_task_under_an_external_id_another_products_create_holds() {
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let below = tower::service_fn(|req: http::Request<http_body_util::Full<bytes::Bytes>>| {
        let answer: Result<_, kling_core::error::BoxError> = if req.method() == http::Method::POST {
            Err(Box::new(kling_core::error::Transport::after_sent("reset")))
        } else if req.uri().path() == "/v1/videos/text2video" {
            let task = serde_json::json!({"task_id": "v9", "task_status": "processing",
                "task_info": {"external_task_id": "job-7"}});
            Ok(envelope(200, 0, &serde_json::json!([task])))
        } else {
            Ok(envelope(200, 0, &serde_json::json!([])))
        };
        std::future::ready(answer)
    });
    let mut svc = layer.layer(below);
    svc.ready().await.unwrap();
    assert!(svc.call(image_with_external("job-7")).await.is_err());
    assert_eq!(
        pool_state(&handle, &image()).await.0,
        1,
        "may have made a task"
    );

    let plan = kling_concurrency::Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut svc, &plan).await.unwrap();
    assert_eq!((found.unfinished, found.adopted), (1, 1));
    assert_eq!(pool_state(&handle, &video()).await.0, 1, "the video runs");

    // The video's end frees the video's slot, not the image create's.
    let released = handle.complete("v9").await.unwrap().expect("v9 held");
    assert_eq!(released.key.pool, video());
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
    assert_eq!(
        pool_state(&handle, &image()).await.0,
        1,
        "the image may run"
    );
}

/// A video task a reconcile adopted from a list that did not give its external id, and an
/// image create of unknown outcome under `job-7`: the video's callback, naming it by both
/// ids, does not take the image create for it (another product's create). Before, the image
/// create's holding took the video's task id and the adopted video holding gave its slot
/// back: the video pool counted a slot too few while the video ran.
#[tokio::test(start_paused = true)]
async fn a_callback_joins_no_adopted_task_with_another_products_create() {
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1)).unwrap();
    let below = tower::service_fn(|req: http::Request<http_body_util::Full<bytes::Bytes>>| {
        let answer: Result<_, kling_core::error::BoxError> = if req.method() == http::Method::POST {
            Err(Box::new(kling_core::error::Transport::after_sent("reset")))
        } else if req.uri().path() == "/v1/videos/text2video" {
            let task = serde_json::json!({"task_id": "v9", "task_status": "processing"});
            Ok(envelope(200, 0, &serde_json::json!([task])))
        } else {
            Ok(envelope(200, 0, &serde_json::json!([])))
        };
        std::future::ready(answer)
    });
    let mut svc = layer.layer(below);
    svc.ready().await.unwrap();
    assert!(svc.call(image_with_external("job-7")).await.is_err());
    let plan = kling_concurrency::Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut svc, &plan).await.unwrap();
    assert_eq!(found.adopted, 1);

    let running =
        br#"{"task_id":"v9","task_status":"processing","task_info":{"external_task_id":"job-7"}}"#;
    handle.on_callback(running).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await.0, 1, "the video runs");
    assert_eq!(
        pool_state(&handle, &image()).await.0,
        1,
        "the image may run"
    );
    let released = handle.complete("v9").await.unwrap().expect("v9 held");
    assert_eq!(released.key.pool, video());
    assert_eq!(
        pool_state(&handle, &image()).await.0,
        1,
        "the image may run"
    );
}

/// A legacy video create with an external id, sent to image2video.
fn image2video_with_external(external: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    post(
        "/v1/videos/image2video",
        &format!(r#"{{"image":"a.png","external_task_id":"{external}"}}"#),
    )
}

type Req = http::Request<http_body_util::Full<bytes::Bytes>>;
type Answer =
    Result<http::Response<http_body_util::Full<bytes::Bytes>>, kling_core::error::BoxError>;

/// Below the slots: every create is reset after it was sent (its outcome unknown), and the
/// text2video list names `v9` running (under `job-7` with `with_external`); other lists are
/// empty.
fn lists_v9(
    with_external: bool,
) -> impl tower::Service<
    Req,
    Response = http::Response<http_body_util::Full<bytes::Bytes>>,
    Error = kling_core::error::BoxError,
    Future = std::future::Ready<Answer>,
> + Clone {
    tower::service_fn(move |req: Req| {
        let answer: Answer = if req.method() == http::Method::POST {
            Err(Box::new(kling_core::error::Transport::after_sent("reset")))
        } else if req.uri().path() == "/v1/videos/text2video" {
            let mut task = serde_json::json!({"task_id": "v9", "task_status": "processing"});
            if with_external {
                task["task_info"] = serde_json::json!({"external_task_id": "job-7"});
            }
            Ok(envelope(200, 0, &serde_json::json!([task])))
        } else {
            Ok(envelope(200, 0, &serde_json::json!([])))
        };
        std::future::ready(answer)
    })
}

/// A reconcile lists the text2video task `v9` under `job-7` while an image2video create of
/// the account under `job-7` is of unknown outcome (its answer lost): of the same product,
/// but another create path's (external ids may be unique per create path only; the list of
/// text2video names no image2video task), so `v9` is adopted, and its end frees its own slot,
/// not the image2video create's. Before, the create's holding took `v9`'s id and nothing was
/// adopted: the video pool counted a slot too few, and `v9`'s end freed the create's slot.
#[tokio::test(start_paused = true)]
async fn a_reconcile_adopts_a_task_under_an_external_id_another_paths_create_holds() {
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc = layer.layer(lists_v9(true));
    svc.ready().await.unwrap();
    assert!(svc.call(image2video_with_external("job-7")).await.is_err());
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "may have made a task"
    );

    let plan = kling_concurrency::Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut svc, &plan).await.unwrap();
    assert_eq!((found.unfinished, found.adopted), (1, 1));
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        2,
        "v9 and the create"
    );

    handle.complete("v9").await.unwrap().expect("v9 held");
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "the image2video create may run"
    );
}

/// The text2video task `v9` a reconcile adopted from a list that did not give its external
/// id, and an image2video create of unknown outcome under `job-7`: `v9`'s callback, naming
/// it with `job-7`, does not join it with that create (another create path's, though of the
/// same product). Before, the create's holding took `v9`'s id and the adopted one gave its
/// slot back: one slot for two tasks that may run.
#[tokio::test(start_paused = true)]
async fn a_callback_joins_no_adopted_task_with_another_paths_create() {
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc = layer.layer(lists_v9(false));
    svc.ready().await.unwrap();
    assert!(svc.call(image2video_with_external("job-7")).await.is_err());
    let plan = kling_concurrency::Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut svc, &plan).await.unwrap();
    assert_eq!(found.adopted, 1);

    let running =
        br#"{"task_id":"v9","task_status":"processing","task_info":{"external_task_id":"job-7"}}"#;
    handle.on_callback(running).await.unwrap();
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        2,
        "v9 and the create"
    );
    handle.complete("v9").await.unwrap().expect("v9 held");
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "the image2video create may run"
    );
}

/// A reconcile adopts the text2video task `v9` under `job-7`, then an image2video create
/// under `job-7` loses its answer: that create is not `v9` (another create path's), so it
/// does not take `v9`'s id from the adopted holding. Before, it did, and the adopted holding
/// gave its slot back: `v9`'s end then freed the create's slot while it may run.
#[tokio::test(start_paused = true)]
async fn a_create_on_another_path_takes_no_adopted_task_under_its_external_id() {
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(2)).unwrap();
    let mut svc = layer.layer(lists_v9(true));
    let plan = kling_concurrency::Reconcile::new("").legacy_paths(["/v1/videos/text2video"]);
    let found = handle.reconcile(&mut svc, &plan).await.unwrap();
    assert_eq!(found.adopted, 1);
    svc.ready().await.unwrap();
    assert!(svc.call(image2video_with_external("job-7")).await.is_err());
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        2,
        "v9 and the create"
    );

    handle.complete("v9").await.unwrap().expect("v9 held");
    assert_eq!(
        pool_state(&handle, &video()).await.0,
        1,
        "the image2video create may run"
    );
}

/// A backend that notes the path each query's answer is handed to it with, and applies it as
/// the in-process backend does.
#[derive(Clone)]
struct NotesPaths {
    inner: InProcess,
    paths: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl SlotBackend for NotesPaths {
    type Acquire = InProcessAcquire;
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

    fn observe_unread_of(
        &self,
        account: &AccountId,
        outcome: &Outcome,
        lease: Duration,
        path: ReportPath<'_>,
    ) -> Self::Apply {
        self.paths.lock().unwrap().push(format!("{path:?}"));
        self.inner.observe_unread_of(account, outcome, lease, path)
    }
}

/// A legacy query's answer is handed to the backend with the query's path unread
/// (`ReportPath::LegacyQuery`): the task it reports is found by its task id, and reading the
/// path's create path (its plain check and hash) would cost more than the rest of the query's
/// bookkeeping. The task still ends.
#[tokio::test(start_paused = true)]
async fn a_legacy_querys_path_is_handed_on_unread() {
    let config = SlotsConfig::new(1);
    let backend = NotesPaths {
        inner: InProcess::new(config.clone()).unwrap(),
        paths: Default::default(),
    };
    let layer = TaskSlotsLayer::with_backend(&config, backend.clone()).unwrap();
    let handle = layer.handle();
    let fake = Fake::new();
    let mut svc = layer.layer(fake.clone());
    svc.ready().await.unwrap();
    svc.call(create_with_external("job-7")).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
    fake.finish("t1");
    svc.ready().await.unwrap();
    svc.call(get("/v1/videos/text2video/t1")).await.unwrap();
    assert_eq!(
        *backend.paths.lock().unwrap(),
        [r#"LegacyQuery("/v1/videos/text2video/t1")"#]
    );
    assert_eq!(pool_state(&handle, &video()).await.0, 0, "ended");
}
