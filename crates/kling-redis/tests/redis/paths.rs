//! One external id on two create paths, in Redis as in kling-concurrency's in-process backend:
//! external ids may be unique per create path only (the mock's rule; a legacy task is looked up
//! at `{create path}/{external id}`), and a callback or `complete` names no path. A report
//! found by its external id alone never frees the slot of another path's task.
//!
//! kling-concurrency's `tests/slots/paths.rs` at the backend's level: each case calls what the
//! layer calls (`hold_unread_on`, `observe_unread_on`, `apply_unread_on`, `apply`) and runs
//! on `InProcess` (the reference) and on a fleet of two `RedisSlots` processes, one creating
//! and the other reporting (so that Redis, not the reporting process's own record, decides).

use std::future::Future;
use std::time::Duration;

use kling_concurrency::SlotsConfig;
use kling_concurrency::backend::{
    Applied, CreatePath, InProcess, SlotBackend, SlotKey, SlotOp, TaskRef, TaskUpdate,
};
use kling_core::{AccountId, Outcome, Pool, Product, TaskStatus};
use kling_redis::RedisSlots;

use crate::support::{connect, redis};

const LEASE: Duration = Duration::from_secs(600);
const TEXT2VIDEO: &str = "/v1/videos/text2video";
const IMAGE2VIDEO: &str = "/v1/videos/image2video";
const IMAGES: &str = "/v1/images/generations";

fn account() -> AccountId {
    AccountId::new("acct")
}

fn video() -> SlotKey {
    SlotKey::new(account(), Pool::new(Product::Video))
}

fn image() -> SlotKey {
    SlotKey::new(account(), Pool::new(Product::Image))
}

fn on(path: &str) -> CreatePath {
    CreatePath::legacy(path)
}

/// Runs `case` on the in-process backend (both "processes" one), then on two `RedisSlots`
/// processes sharing a fresh Redis.
async fn on_both<F, Fut, Fr, FutR>(capacity: u32, case: F, redis_case: Fr)
where
    F: FnOnce([InProcess; 2]) -> Fut,
    Fut: Future<Output = ()>,
    Fr: FnOnce([RedisSlots; 2]) -> FutR,
    FutR: Future<Output = ()>,
{
    let memory = InProcess::new(SlotsConfig::new(capacity).lease(LEASE)).unwrap();
    case([memory.clone(), memory]).await;
    let Some(server) = redis() else { return };
    let process = || async {
        RedisSlots::new(
            connect(&server).await,
            SlotsConfig::new(capacity).lease(LEASE),
        )
        .unwrap()
        .poll_every(Duration::from_secs(30))
        .grace(Duration::from_millis(1))
    };
    let fleet = [process().await, process().await];
    redis_case(fleet).await;
}

/// Runs the generic `case` on both backends.
macro_rules! both {
    ($capacity:expr, $case:ident) => {
        on_both(
            $capacity,
            |procs| async move { $case(procs).await },
            |procs| async move { $case(procs).await },
        )
        .await
    };
}

/// Slots of `key` in use.
async fn in_use<B: SlotBackend>(backend: &B, key: &SlotKey) -> u32 {
    let snapshot = backend.snapshot().await.unwrap();
    snapshot
        .iter()
        .find(|p| p.key == *key)
        .map_or(0, |p| p.in_use)
}

/// A create of one slot of `key` under `ext` sent to `path`, answered with `id` (`None`: its
/// answer lost, its outcome unknown), kept as the layer keeps it.
async fn create<B: SlotBackend>(
    backend: &B,
    key: SlotKey,
    id: Option<&str>,
    ext: &str,
    path: &str,
) {
    let reservation = backend.acquire(key, 1).await.unwrap();
    backend
        .hold_unread_on(reservation, id, Some(ext), LEASE, None, on(path))
        .await
        .unwrap();
}

/// A callback's report (no create path): task `id` under `ext` has `status`.
fn callback(id: &str, ext: &str, status: TaskStatus) -> SlotOp {
    SlotOp::Update {
        account: account(),
        updates: vec![TaskUpdate {
            id: id.to_owned(),
            external_id: Some(ext.to_owned()),
            status: Some(status),
        }],
        lease: LEASE,
    }
}

/// `complete(text)`.
fn complete(text: &str) -> SlotOp {
    SlotOp::Update {
        account: account(),
        updates: vec![TaskUpdate {
            id: text.to_owned(),
            external_id: None,
            status: None,
        }],
        lease: LEASE,
    }
}

/// A lookup at `{path}/{ext}` that found no task, as the layer applies it.
async fn found_nothing<B: SlotBackend>(backend: &B, path: &str, ext: &str) -> Applied {
    let update = SlotOp::Update {
        account: account(),
        updates: vec![TaskUpdate {
            id: String::new(),
            external_id: Some(ext.to_owned()),
            status: None,
        }],
        lease: LEASE,
    };
    let path = CreatePath::of_legacy_query(&format!("{path}/{ext}"));
    backend.apply_unread_on(update, path).await.unwrap()
}

/// A legacy query's answer at `{path}/{asked}`: task `id` under `ext` with `status`, as the
/// layer observes it.
async fn queried<B: SlotBackend>(
    backend: &B,
    path: &str,
    asked: &str,
    id: &str,
    ext: &str,
    status: &str,
) -> Applied {
    let body = serde_json::json!({
        "code": 0,
        "message": "SUCCEED",
        "request_id": "r-1",
        "data": {
            "task_id": id,
            "task_status": status,
            "task_info": {"external_task_id": ext},
        },
    })
    .to_string();
    let outcome = Outcome::parse(
        http::StatusCode::OK,
        &http::HeaderMap::new(),
        body.as_bytes(),
        tokio::time::Instant::now(),
    )
    .unwrap();
    assert_eq!(outcome.tasks().len(), 1);
    let path = CreatePath::of_legacy_query(&format!("{path}/{asked}"));
    backend
        .observe_unread_on(&account(), &outcome, LEASE, path)
        .await
        .unwrap()
}

fn tasks(applied: &Applied) -> Vec<&str> {
    applied
        .released
        .iter()
        .map(|r| r.task.as_deref().unwrap_or(""))
        .collect()
}

/// A video held under `job-7` (answered `t1`) and an image task `t2` created with `job-7` too:
/// the image's query frees its slot, and its callback after frees nothing (it found the
/// video's holding by `job-7` and freed it while the video ran). The video's own callback
/// frees it.
async fn another_paths_callback<B: SlotBackend>([one, two]: [B; 2]) {
    create(&one, video(), Some("t1"), "job-7", TEXT2VIDEO).await;
    create(&one, image(), Some("t2"), "job-7", IMAGES).await;
    let applied = queried(&two, IMAGES, "t2", "t2", "job-7", "succeed").await;
    assert_eq!(in_use(&two, &image()).await, 0, "{applied:?}");

    let applied = two
        .apply(callback("t2", "job-7", TaskStatus::Succeeded))
        .await
        .unwrap();
    assert!(applied.released.is_empty(), "{applied:?}");
    assert_eq!(in_use(&two, &video()).await, 1, "the video runs");

    let applied = two
        .apply(callback("t1", "job-7", TaskStatus::Succeeded))
        .await
        .unwrap();
    assert_eq!(tasks(&applied), ["t1"]);
    assert_eq!(in_use(&two, &video()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_for_another_paths_task_under_the_same_external_id_frees_no_slot() {
    both!(1, another_paths_callback);
}

/// A callback for task `t9` under `job-7` comes before any create under it (noted under both,
/// in case its create's answer is on the way): the video create answered `t1` under `job-7`
/// is another task, and keeps its slot until its own callback. A create of unknown outcome
/// under `job-7` may be `t9`'s, and the note frees it at once.
async fn an_earlier_callback<B: SlotBackend>([one, two]: [B; 2]) {
    let applied = two
        .apply(callback("t9", "job-7", TaskStatus::Succeeded))
        .await
        .unwrap();
    assert!(!applied.changed);
    create(&one, video(), Some("t1"), "job-7", TEXT2VIDEO).await;
    assert_eq!(in_use(&one, &video()).await, 1, "t1 runs");
    let applied = two
        .apply(callback("t1", "job-7", TaskStatus::Succeeded))
        .await
        .unwrap();
    assert_eq!(tasks(&applied), ["t1"]);
    assert_eq!(in_use(&one, &video()).await, 0);

    create(&one, video(), None, "job-7", TEXT2VIDEO).await;
    assert_eq!(in_use(&one, &video()).await, 0, "t9's create, answer lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_callback_for_another_task_under_the_same_external_id_frees_no_later_create() {
    both!(1, an_earlier_callback);
}

/// `complete("job-7")` with a video and an image running under `job-7` cannot tell which one
/// ended, and frees neither; once the image ended by its query, `job-7` names the video alone.
async fn complete_shared<B: SlotBackend>([one, two]: [B; 2]) {
    create(&one, video(), Some("t1"), "job-7", TEXT2VIDEO).await;
    create(&one, image(), Some("t2"), "job-7", IMAGES).await;
    let applied = two.apply(complete("job-7")).await.unwrap();
    assert!(applied.released.is_empty(), "{applied:?}");
    assert_eq!(in_use(&two, &video()).await, 1);
    assert_eq!(in_use(&two, &image()).await, 1);

    queried(&two, IMAGES, "t2", "t2", "job-7", "succeed").await;
    assert_eq!(in_use(&two, &image()).await, 0);
    let applied = two.apply(complete("job-7")).await.unwrap();
    assert_eq!(tasks(&applied), ["t1"]);
    assert_eq!(in_use(&two, &video()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_by_an_external_id_two_paths_share_frees_neither() {
    both!(1, complete_shared);
}

/// Creates of unknown outcome under `job-7`, a video and an image: the image's is no video
/// create sent again, so the video's slot stays held; a callback naming `job-7` with a task id
/// held nowhere may be either's, and frees neither (nor does a report by `job-7` alone). The
/// image create sent again and answered replaces the image's earlier holding only.
async fn unknown_on_two_paths<B: SlotBackend>([one, two]: [B; 2]) {
    create(&one, video(), None, "job-7", TEXT2VIDEO).await;
    create(&one, image(), None, "job-7", IMAGES).await;
    assert_eq!(in_use(&one, &video()).await, 1, "the video may run");
    assert_eq!(in_use(&one, &image()).await, 1);

    let applied = two
        .apply(callback("t5", "job-7", TaskStatus::Succeeded))
        .await
        .unwrap();
    assert!(applied.released.is_empty(), "{applied:?}");
    let applied = two
        .apply(callback("", "job-7", TaskStatus::Succeeded))
        .await
        .unwrap();
    assert!(applied.released.is_empty(), "{applied:?}");
    assert_eq!(in_use(&two, &video()).await, 1);
    assert_eq!(in_use(&two, &image()).await, 1);

    create(&one, image(), Some("t1"), "job-7", IMAGES).await;
    assert_eq!(
        in_use(&one, &image()).await,
        1,
        "t1 in place of the lost one"
    );
    assert_eq!(in_use(&one, &video()).await, 1);
    // Both stay findable: the image's callback ends it by task id, and `job-7` alone then
    // names the video's create.
    let applied = two
        .apply(callback("t1", "job-7", TaskStatus::Succeeded))
        .await
        .unwrap();
    assert_eq!(tasks(&applied), ["t1"]);
    let applied = two
        .apply(callback("t6", "job-7", TaskStatus::Succeeded))
        .await
        .unwrap();
    // (Released under its external id: the holding never learned a task id.)
    assert_eq!(tasks(&applied), ["job-7"], "the video's create was t6");
    assert_eq!(in_use(&two, &video()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_of_unknown_outcome_on_two_paths_under_one_external_id_keep_their_slots() {
    both!(2, unknown_on_two_paths);
}

/// Creates of unknown outcome under `job-7` on two paths: a lookup at
/// `/v1/images/generations/job-7` that finds nothing gives the image create's slot back, and
/// says nothing of the video create's, sent elsewhere.
async fn lookup_finds_nothing<B: SlotBackend>([one, two]: [B; 2]) {
    create(&one, video(), None, "job-7", TEXT2VIDEO).await;
    create(&one, image(), None, "job-7", IMAGES).await;
    found_nothing(&two, IMAGES, "job-7").await;
    assert_eq!(in_use(&two, &image()).await, 0);
    assert_eq!(in_use(&two, &video()).await, 1, "the video may run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_that_finds_nothing_frees_the_create_of_its_own_path_only() {
    both!(1, lookup_finds_nothing);
}

/// An image create and a video create of unknown outcome under `job-7`: the image path's
/// lookup by `job-7` reports the image task `t1` running, which gives its task id to the image
/// create's holding (not the video's), so the image's callback then ends it by task id; the
/// video's slot stays held.
async fn lookup_names_its_task<B: SlotBackend>([one, two]: [B; 2]) {
    create(&one, image(), None, "job-7", IMAGES).await;
    create(&one, video(), None, "job-7", TEXT2VIDEO).await;
    queried(&two, IMAGES, "job-7", "t1", "job-7", "processing").await;
    let applied = two
        .apply(callback("t1", "job-7", TaskStatus::Succeeded))
        .await
        .unwrap();
    assert_eq!(tasks(&applied), ["t1"]);
    assert_eq!(in_use(&two, &image()).await, 0);
    assert_eq!(in_use(&two, &video()).await, 1, "the video may run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_names_its_task_to_the_create_of_its_own_path_only() {
    both!(1, lookup_names_its_task);
}

/// Two paths of one pool (`text2video` and `image2video`, both `video`): a create of unknown
/// outcome under `job-7` on one is no earlier attempt of the other's, and keeps its slot; a
/// lookup on one path that finds nothing frees that path's create only.
async fn two_paths_one_pool<B: SlotBackend>([one, two]: [B; 2]) {
    create(&one, video(), None, "job-7", TEXT2VIDEO).await;
    create(&one, video(), None, "job-7", IMAGE2VIDEO).await;
    assert_eq!(in_use(&one, &video()).await, 2);
    found_nothing(&two, TEXT2VIDEO, "job-7").await;
    assert_eq!(in_use(&two, &video()).await, 1);
    found_nothing(&two, TEXT2VIDEO, "job-7").await;
    assert_eq!(in_use(&two, &video()).await, 1, "image2video's stays");
    found_nothing(&two, IMAGE2VIDEO, "job-7").await;
    assert_eq!(in_use(&two, &video()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_on_two_paths_of_one_pool_under_one_external_id_are_two_tasks() {
    both!(2, two_paths_one_pool);
}

/// Without the paths (a `Hold` built by a caller), creates of unknown outcome under one
/// external id in two pools of an account are two creates: the later one keeps the earlier
/// one's slots held. In one pool, the later one replaces it.
async fn another_pool<B: SlotBackend>([one, _]: [B; 2]) {
    for key in [video(), image(), image()] {
        let reservation = one.acquire(key, 1).await.unwrap();
        let task = TaskRef {
            id: None,
            external_id: Some("job-7".to_owned()),
        };
        let hold = SlotOp::Hold {
            reservation,
            task,
            lease: LEASE,
        };
        one.apply(hold).await.unwrap();
    }
    assert_eq!(in_use(&one, &video()).await, 1);
    assert_eq!(in_use(&one, &image()).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_of_unknown_outcome_in_another_pool_is_no_earlier_attempt() {
    both!(5, another_pool);
}

/// A report of task `id` ended, by its task id alone.
fn ended(id: &str) -> SlotOp {
    SlotOp::Update {
        account: account(),
        updates: vec![TaskUpdate {
            id: id.to_owned(),
            external_id: None,
            status: Some(TaskStatus::Succeeded),
        }],
        lease: LEASE,
    }
}

/// A reconcile's adopt of the task `id` (under `ext`, if given) listed in `key`'s pool.
fn adopt(key: SlotKey, id: &str, ext: Option<&str>) -> SlotOp {
    SlotOp::Adopt {
        key,
        task: TaskRef {
            id: Some(id.to_owned()),
            external_id: ext.map(str::to_owned),
        },
        weight: 1,
        lease: LEASE,
    }
}

/// A reconcile's list names a running task under an external id that a task of another
/// create path, known by its own task id, carries too: it is adopted, not taken for the one
/// held. So is one whose external id an ended report of another task id named. A holding whose
/// task id is unknown may be the listed task, and is taken for it: one of the listed task's
/// product only (a video create is no image task's).
async fn adopt_under_another_tasks_external_id<B: SlotBackend>([one, two]: [B; 2]) {
    let adopt = |id: &str, ext: &str| SlotOp::Adopt {
        key: image(),
        task: TaskRef {
            id: Some(id.to_owned()),
            external_id: Some(ext.to_owned()),
        },
        weight: 1,
        lease: LEASE,
    };
    create(&one, video(), Some("tv"), "job-7", TEXT2VIDEO).await;
    assert!(two.apply(adopt("ti", "job-7")).await.unwrap().changed);
    // An image task `t8` under `job-8` ended (its slot freed elsewhere, or never here).
    two.apply(callback("t8", "job-8", TaskStatus::Succeeded))
        .await
        .unwrap();
    assert!(two.apply(adopt("t9", "job-8")).await.unwrap().changed);
    // An image create of unknown outcome under `job-9`: the listed `t10` under it may be its
    // task, and is known by its id from then on.
    create(&one, image(), None, "job-9", IMAGES).await;
    assert!(!two.apply(adopt("t10", "job-9")).await.unwrap().changed);
    // A video create of unknown outcome under `job-10` is no image task's create (another
    // path's): the image `t11` listed under `job-10` is adopted, and the video create learns
    // no task id of it.
    create(&one, video(), None, "job-10", TEXT2VIDEO).await;
    assert!(two.apply(adopt("t11", "job-10")).await.unwrap().changed);
    assert_eq!(
        in_use(&two, &video()).await,
        2,
        "tv and the video create under job-10"
    );
    assert_eq!(
        in_use(&two, &image()).await,
        4,
        "ti, t9, the image create (t10) and t11"
    );
    let applied = two.apply(ended("t10")).await.unwrap();
    assert_eq!(tasks(&applied), ["t10"], "the image create's task");
    assert_eq!(applied.released[0].key, image());
    let applied = two.apply(ended("t11")).await.unwrap();
    assert_eq!(tasks(&applied), ["t11"]);
    assert_eq!(applied.released[0].key, image(), "not the video create");
    assert_eq!(in_use(&two, &video()).await, 2);
    // Creates of unknown outcome under `job-11`, a video and an image: the image `t12` listed
    // under it is the image create's task alone, which learns its id.
    create(&one, video(), None, "job-11", TEXT2VIDEO).await;
    create(&one, image(), None, "job-11", IMAGES).await;
    assert!(!two.apply(adopt("t12", "job-11")).await.unwrap().changed);
    let applied = two.apply(ended("t12")).await.unwrap();
    assert_eq!(tasks(&applied), ["t12"], "the image create's task");
    assert_eq!(applied.released[0].key, image());
    assert_eq!(in_use(&two, &video()).await, 3, "the video create may run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopt_under_another_tasks_external_id_is_adopted() {
    both!(5, adopt_under_another_tasks_external_id);
}

/// A reconcile lists a video task `v9` under `job-7` while an image create of the account
/// under `job-7` is of unknown outcome (its answer lost): the image create is another path's
/// (external ids may be unique per create path only), so the video task is adopted into the
/// video pool, and its end frees the video's slot, not the image create's. (The image create
/// took the video's task id, and nothing was adopted.)
async fn adopt_beside_another_products_create<B: SlotBackend>([one, two]: [B; 2]) {
    create(&one, image(), None, "job-7", IMAGES).await;
    let applied = two
        .apply(adopt(video(), "v9", Some("job-7")))
        .await
        .unwrap();
    assert!(applied.changed, "adopted");
    assert_eq!(in_use(&two, &video()).await, 1, "the video runs");
    let applied = two.apply(complete("v9")).await.unwrap();
    assert_eq!(tasks(&applied), ["v9"]);
    assert_eq!(applied.released[0].key, video());
    assert_eq!(in_use(&two, &video()).await, 0);
    assert_eq!(in_use(&two, &image()).await, 1, "the image may run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_adopts_a_task_under_an_external_id_another_products_create_holds() {
    both!(1, adopt_beside_another_products_create);
}

/// A video task `v9` a reconcile adopted from a list that did not give its external id, and an
/// image create of unknown outcome under `job-7`: the video's callback, naming it by both ids,
/// does not take the image create for it (another product's create). (The image create took
/// the video's task id and the adopted video gave its slot back: the video pool counted a slot
/// too few while the video ran.)
async fn callback_beside_another_products_create<B: SlotBackend>([one, two]: [B; 2]) {
    create(&one, image(), None, "job-7", IMAGES).await;
    let applied = two.apply(adopt(video(), "v9", None)).await.unwrap();
    assert!(applied.changed, "adopted");
    two.apply(callback("v9", "job-7", TaskStatus::Processing))
        .await
        .unwrap();
    assert_eq!(in_use(&two, &video()).await, 1, "the video runs");
    assert_eq!(in_use(&two, &image()).await, 1, "the image may run");
    let applied = two.apply(complete("v9")).await.unwrap();
    assert_eq!(tasks(&applied), ["v9"]);
    assert_eq!(applied.released[0].key, video());
    assert_eq!(in_use(&two, &image()).await, 1, "the image may run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_joins_no_adopted_task_with_another_products_create() {
    both!(1, callback_beside_another_products_create);
}

/// A reconcile's list of text2video names `v9` under `job-7` while an image2video create of
/// the account under `job-7` is of unknown outcome: of the same product, but another create
/// path's (a legacy list names its own path's tasks only), so `v9` is adopted, and its end
/// frees its own slot, not the create's. So is `n9`, listed by a new-style list under `job-8`,
/// beside a legacy create under `job-8`. A create of the list's path under `job-9` is the
/// listed `v10`. (The creates took the listed tasks' ids, and nothing was adopted.)
async fn adopt_beside_another_paths_create<B: SlotBackend>([one, two]: [B; 2]) {
    create(&one, video(), None, "job-7", IMAGE2VIDEO).await;
    let applied = two
        .adopt_on(adopt(video(), "v9", Some("job-7")), on(TEXT2VIDEO))
        .await
        .unwrap();
    assert!(applied.changed, "adopted");
    create(&one, video(), None, "job-8", TEXT2VIDEO).await;
    let applied = two
        .adopt_on(adopt(video(), "n9", Some("job-8")), CreatePath::NEW_STYLE)
        .await
        .unwrap();
    assert!(applied.changed, "adopted");
    create(&one, video(), None, "job-9", TEXT2VIDEO).await;
    let applied = two
        .adopt_on(adopt(video(), "v10", Some("job-9")), on(TEXT2VIDEO))
        .await
        .unwrap();
    assert!(!applied.changed, "the job-9 create's task");
    assert_eq!(in_use(&two, &video()).await, 5, "three creates, v9 and n9");
    for id in ["v9", "n9", "v10"] {
        let applied = two.apply(complete(id)).await.unwrap();
        assert_eq!(tasks(&applied), [id]);
    }
    assert_eq!(
        in_use(&two, &video()).await,
        2,
        "the job-7 and job-8 creates may run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_adopts_a_task_under_an_external_id_another_paths_create_holds() {
    both!(5, adopt_beside_another_paths_create);
}

/// `v9`, adopted from a text2video list that did not give its external id, and an
/// image2video create of unknown outcome under `job-7`: `v9`'s callback, naming it with
/// `job-7`, does not join it with that create (another path's, of the same product). (The
/// create took `v9`'s id, and the adopted holding gave its slot back.)
async fn callback_beside_another_paths_create<B: SlotBackend>([one, two]: [B; 2]) {
    create(&one, video(), None, "job-7", IMAGE2VIDEO).await;
    let applied = two
        .adopt_on(adopt(video(), "v9", None), on(TEXT2VIDEO))
        .await
        .unwrap();
    assert!(applied.changed, "adopted");
    two.apply(callback("v9", "job-7", TaskStatus::Processing))
        .await
        .unwrap();
    assert_eq!(in_use(&two, &video()).await, 2, "v9 and the create");
    let applied = two.apply(complete("v9")).await.unwrap();
    assert_eq!(tasks(&applied), ["v9"]);
    assert_eq!(in_use(&two, &video()).await, 1, "the create may run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_joins_no_adopted_task_with_another_paths_create() {
    both!(2, callback_beside_another_paths_create);
}

/// `v9`, adopted from a text2video list under `job-7`, then an image2video create under
/// `job-7` whose answer is lost: that create is not `v9` (another path's), so it takes no
/// task id from the adopted holding; a text2video create under `job-8` whose answer is lost
/// after `v8` was listed under it is `v8`. (The image2video create took `v9`'s id and the
/// adopted holding gave its slot back: `v9`'s end freed the create's slot.)
async fn create_beside_another_paths_adopted<B: SlotBackend>([one, two]: [B; 2]) {
    let applied = two
        .adopt_on(adopt(video(), "v9", Some("job-7")), on(TEXT2VIDEO))
        .await
        .unwrap();
    assert!(applied.changed, "adopted");
    create(&one, video(), None, "job-7", IMAGE2VIDEO).await;
    assert_eq!(in_use(&two, &video()).await, 2, "v9 and the create");
    let applied = two
        .adopt_on(adopt(video(), "v8", Some("job-8")), on(TEXT2VIDEO))
        .await
        .unwrap();
    assert!(applied.changed, "adopted");
    create(&one, video(), None, "job-8", TEXT2VIDEO).await;
    assert_eq!(in_use(&two, &video()).await, 3, "v8 held once");
    for id in ["v9", "v8"] {
        let applied = two.apply(complete(id)).await.unwrap();
        assert_eq!(tasks(&applied), [id]);
    }
    assert_eq!(in_use(&two, &video()).await, 1, "the job-7 create may run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_on_another_path_takes_no_adopted_task_under_its_external_id() {
    both!(5, create_beside_another_paths_adopted);
}

/// `n9`, adopted from a new-style list under `job-9` into the pool the plan names for the
/// product (`video:kling-3.0`: a list does not say the model), then its create, counted in
/// another model's pool (`video:kling-2.6`), whose answer is lost: one task, held once (by
/// its create), and its end frees it. An image `i8` adopted under `job-8` is no video
/// create's task. (The create took `n9`'s id in the same pool only: `n9` held two slots, and
/// its end left the create's held for its lease.)
async fn create_of_another_model_beside_adopted<B: SlotBackend>([one, two]: [B; 2]) {
    let model = |name: &str| SlotKey::new(account(), Pool::with_model(Product::Video, name));
    let (listed, created) = (model("kling-3.0"), model("kling-2.6"));
    let new_style = || CreatePath::NEW_STYLE;
    let lost = |ext: &'static str| {
        let created = created.clone();
        let one = &one;
        async move {
            let reservation = one.acquire(created, 1).await.unwrap();
            one.hold_unread_on(reservation, None, Some(ext), LEASE, None, new_style())
                .await
                .unwrap();
        }
    };
    let adopted = two
        .adopt_on(adopt(listed.clone(), "n9", Some("job-9")), new_style())
        .await
        .unwrap();
    assert!(adopted.changed, "adopted");
    lost("job-9").await;
    assert_eq!(
        in_use(&two, &listed).await,
        0,
        "the adopted n9 gave it back"
    );
    assert_eq!(
        in_use(&two, &created).await,
        1,
        "n9 held once, by its create"
    );
    let applied = two.apply(ended("n9")).await.unwrap();
    assert_eq!(tasks(&applied), ["n9"]);
    assert_eq!(applied.released[0].key, created);
    assert_eq!(in_use(&two, &created).await, 0, "nothing held for n9");

    let image = SlotKey::new(account(), Pool::with_model(Product::Image, "kling-v2"));
    let adopted = two
        .adopt_on(adopt(image.clone(), "i8", Some("job-8")), new_style())
        .await
        .unwrap();
    assert!(adopted.changed, "adopted");
    lost("job-8").await;
    assert_eq!(in_use(&two, &image).await, 1, "i8 runs");
    let applied = two.apply(ended("i8")).await.unwrap();
    assert_eq!(tasks(&applied), ["i8"]);
    assert_eq!(applied.released[0].key, image, "not the video create");
    assert_eq!(in_use(&two, &created).await, 1, "the video create may run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_of_another_models_pool_takes_over_its_adopted_task() {
    both!(5, create_of_another_model_beside_adopted);
}

/// A lost new-style create of `video:kling-2.6` beside tasks adopted under its external id:
/// one adopted into the product's own pool (`video`, a pool name without a model) from the
/// new-style list is its task (the list does not say the model); one listed on a legacy path,
/// or adopted in another account under the same external id, is not.
async fn create_of_a_model_beside_product_wide_adopted<B: SlotBackend>([one, two]: [B; 2]) {
    let model = SlotKey::new(account(), Pool::with_model(Product::Video, "kling-2.6"));
    let other = SlotKey::new(AccountId::new("other"), Pool::new(Product::Video));
    let lost = |ext: &'static str| {
        let (model, one) = (model.clone(), &one);
        async move {
            let reservation = one.acquire(model, 1).await.unwrap();
            one.hold_unread_on(
                reservation,
                None,
                Some(ext),
                LEASE,
                None,
                CreatePath::NEW_STYLE,
            )
            .await
            .unwrap();
        }
    };
    let adopted = two
        .adopt_on(adopt(video(), "v5", Some("job-5")), on(TEXT2VIDEO))
        .await
        .unwrap();
    assert!(adopted.changed, "adopted");
    let adopted = two
        .adopt_on(
            adopt(other.clone(), "w5", Some("job-5")),
            CreatePath::NEW_STYLE,
        )
        .await
        .unwrap();
    assert!(adopted.changed, "adopted");
    lost("job-5").await;
    assert_eq!(in_use(&two, &video()).await, 1, "v5, a legacy list's, runs");
    assert_eq!(in_use(&two, &other).await, 1, "w5, another account's, runs");
    assert_eq!(in_use(&two, &model).await, 1, "the create may run");

    let adopted = two
        .adopt_on(adopt(video(), "n6", Some("job-6")), CreatePath::NEW_STYLE)
        .await
        .unwrap();
    assert!(adopted.changed, "adopted");
    lost("job-6").await;
    assert_eq!(
        in_use(&two, &video()).await,
        1,
        "the adopted n6 gave it back"
    );
    assert_eq!(in_use(&two, &model).await, 2, "n6 held by its create");
    let applied = two.apply(ended("n6")).await.unwrap();
    assert_eq!(tasks(&applied), ["n6"]);
    assert_eq!(applied.released[0].key, model);
    assert_eq!(in_use(&two, &model).await, 1, "the job-5 create may run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_joins_a_product_wide_adopted_task_of_its_path_and_account_only() {
    both!(5, create_of_a_model_beside_product_wide_adopted);
}

/// The finished-task metrics recorded so far (on this thread): how many tasks were counted
/// finished, and how many lifetimes.
fn finished_counted(snapshotter: &metrics_util::debugging::Snapshotter) -> (u64, usize) {
    use kling_core::metrics::{TASK_LIFETIME, TASKS_FINISHED};
    use metrics_util::debugging::DebugValue;
    let (mut finished, mut lifetimes) = (0, 0);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        match value {
            DebugValue::Counter(n) if key.key().name() == TASKS_FINISHED => finished += n,
            DebugValue::Histogram(seen) if key.key().name() == TASK_LIFETIME => {
                lifetimes += seen.len();
            }
            _ => {}
        }
    }
    (finished, lifetimes)
}

/// Slots of `key` in use, and its capacity less what 1303s hide.
async fn in_use_and_capacity<B: SlotBackend>(backend: &B, key: &SlotKey) -> (u32, u32) {
    let snapshot = backend.snapshot().await.unwrap();
    let pool = snapshot.iter().find(|p| p.key == *key).expect("pool used");
    (pool.in_use, pool.capacity)
}

/// A lookup by external id that finds nothing gives back the slots of the create held under
/// it: that create never happened, so no task ended. None counts as finished (it counted as a
/// `completed` task, with a lifetime), and no slot hidden by a `1303` comes back for it (it
/// brought one back, as a task of ours ending does).
async fn never_made<B: SlotBackend>(
    [one, two]: [B; 2],
    snapshotter: &metrics_util::debugging::Snapshotter,
) {
    create(&one, video(), None, "job-1", TEXT2VIDEO).await;
    let refused = one.acquire(video(), 1).await.unwrap();
    one.apply(SlotOp::Congested(refused)).await.unwrap();
    assert_eq!(
        in_use_and_capacity(&two, &video()).await,
        (1, 1),
        "two slots hidden"
    );
    found_nothing(&two, TEXT2VIDEO, "job-1").await;
    assert_eq!(
        in_use_and_capacity(&two, &video()).await,
        (0, 1),
        "given back; still two hidden"
    );
    assert_eq!(finished_counted(snapshotter), (0, 0), "no task finished");
}

// (A current-thread runtime: the recorder is this thread's.)
#[tokio::test]
async fn a_create_that_never_happened_is_no_finished_task_and_brings_no_hidden_slot_back() {
    let recorder = Box::leak(Box::new(metrics_util::debugging::DebuggingRecorder::new()));
    let snapshotter = recorder.snapshotter();
    let _set = metrics::set_default_local_recorder(recorder);
    let snapshotter = &snapshotter;
    on_both(
        3,
        |procs| async move { never_made(procs, snapshotter).await },
        |procs| async move { never_made(procs, snapshotter).await },
    )
    .await;
}

/// A process of `capacity` slots on `server`, its maintenance pass frequent.
async fn process(server: &kling_redis::testing::RedisServer, capacity: u32) -> RedisSlots {
    RedisSlots::new(
        connect(server).await,
        SlotsConfig::new(capacity).lease(LEASE),
    )
    .unwrap()
    .poll_every(Duration::from_secs(30))
    .maintain_every(Duration::from_millis(50))
    .grace(Duration::from_millis(300))
}

/// The process's own record follows the same rules as the scripts: a create of unknown
/// outcome on another path is no earlier attempt, and while Redis is away a report finds a
/// holding by external id only when it may be its task (no task id known, of the report's
/// path where known, the only one), and a listed task under another task's external id is
/// adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_a_report_finds_by_external_id_only_a_holding_it_may_name() {
    let Some(mut server) = redis() else { return };
    let one = process(&server, 5).await;
    create(&one, video(), None, "job-9", TEXT2VIDEO).await;
    create(&one, video(), None, "job-9", IMAGE2VIDEO).await;
    assert_eq!(one.held_here(), 2, "two creates under job-9");
    assert_eq!(in_use(&one, &video()).await, 2);
    create(&one, video(), None, "job-7", TEXT2VIDEO).await;
    create(&one, image(), None, "job-7", IMAGES).await;
    create(&one, video(), Some("t1"), "job-8", TEXT2VIDEO).await;
    create(&one, image(), None, "job-10", IMAGES).await;
    server.stop();

    let applied = one
        .apply(callback("t5", "job-7", TaskStatus::Succeeded))
        .await
        .unwrap();
    assert!(applied.released.is_empty(), "either's: {applied:?}");
    let applied = one
        .apply(callback("t9", "job-8", TaskStatus::Succeeded))
        .await
        .unwrap();
    assert!(applied.released.is_empty(), "not t1: {applied:?}");
    let applied = found_nothing(&one, IMAGES, "job-7").await;
    assert_eq!(tasks(&applied), ["job-7"]);
    assert_eq!(applied.released[0].key, image());
    let adopt = SlotOp::Adopt {
        key: image(),
        task: TaskRef {
            id: Some("ti".to_owned()),
            external_id: Some("job-8".to_owned()),
        },
        weight: 1,
        lease: LEASE,
    };
    assert!(one.apply(adopt).await.unwrap().changed, "another task");
    // The video's job-7 create is no image task's: the image `ti7` listed under job-7 is
    // adopted.
    let adopt = SlotOp::Adopt {
        key: image(),
        task: TaskRef {
            id: Some("ti7".to_owned()),
            external_id: Some("job-7".to_owned()),
        },
        weight: 1,
        lease: LEASE,
    };
    assert!(one.apply(adopt).await.unwrap().changed, "another product's");
    // A video `v9` listed without its external id, then named with job-10 by its callback,
    // is not joined with the image create under job-10.
    let adopt = SlotOp::Adopt {
        key: video(),
        task: TaskRef {
            id: Some("v9".to_owned()),
            external_id: None,
        },
        weight: 1,
        lease: LEASE,
    };
    assert!(one.apply(adopt).await.unwrap().changed);
    one.apply(callback("v9", "job-10", TaskStatus::Processing))
        .await
        .unwrap();
    let applied = one.apply(complete("v9")).await.unwrap();
    assert_eq!(tasks(&applied), ["v9"]);
    assert_eq!(applied.released[0].key, video(), "not the image create");
    // Both job-9 creates, the video's job-7 create, t1, the image create under job-10, ti
    // and ti7.
    assert_eq!(one.held_here(), 7);
}

/// The process's own record takes a listed task for a create of unknown outcome under its
/// external id only when the list's path may be the create's, as the scripts do: with Redis
/// there (a create after the adopt), and while it is away (an adopt, and a callback that
/// names a task adopted without its external id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_a_listed_task_is_no_other_paths_create() {
    let Some(mut server) = redis() else { return };
    let one = process(&server, 5).await;
    let applied = one
        .adopt_on(adopt(video(), "v6", Some("job-6")), on(TEXT2VIDEO))
        .await
        .unwrap();
    assert!(applied.changed);
    create(&one, video(), None, "job-6", IMAGE2VIDEO).await;
    assert_eq!(one.held_here(), 2, "v6 and the image2video create");
    create(&one, video(), None, "job-7", IMAGE2VIDEO).await;
    create(&one, video(), None, "job-8", IMAGE2VIDEO).await;
    server.stop();

    let applied = one
        .adopt_on(adopt(video(), "v7", Some("job-7")), on(TEXT2VIDEO))
        .await
        .unwrap();
    assert!(applied.changed, "another path's create");
    let applied = one
        .adopt_on(adopt(video(), "v8", None), on(TEXT2VIDEO))
        .await
        .unwrap();
    assert!(applied.changed);
    one.apply(callback("v8", "job-8", TaskStatus::Processing))
        .await
        .unwrap();
    assert_eq!(one.held_here(), 6, "v6, v7, v8 and the three creates");
    let applied = one.apply(complete("v8")).await.unwrap();
    assert_eq!(tasks(&applied), ["v8"]);
    assert_eq!(one.held_here(), 5, "the job-8 create may run");
}

/// After Redis lost its state, each holding registered again keeps its create path: a lookup
/// on the image path that finds nothing under `job-7` frees the image create only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holding_registered_again_keeps_its_create_path() {
    let Some(mut server) = redis() else { return };
    let one = process(&server, 2).await;
    let two = process(&server, 2).await;
    create(&one, video(), None, "job-7", TEXT2VIDEO).await;
    create(&one, image(), None, "job-7", IMAGES).await;
    server.restart().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    // (A snapshot fails while Redis starts again.)
    while two
        .snapshot()
        .await
        .map_or(0, |pools| pools.iter().map(|p| p.in_use).sum::<u32>())
        < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not registered again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    found_nothing(&two, IMAGES, "job-7").await;
    assert_eq!(in_use(&two, &image()).await, 0);
    assert_eq!(in_use(&two, &video()).await, 1, "the video may run");
}

/// A lookup's end sent again after Redis came back older keeps its create path: the image
/// create it freed comes back with the snapshot and is freed again, the video create under the
/// same external id stays held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_sent_again_after_redis_went_back_keeps_its_create_path() {
    let Some(mut server) = redis() else { return };
    let one = process(&server, 2).await;
    let two = process(&server, 2).await;
    create(&one, video(), None, "job-7", TEXT2VIDEO).await;
    create(&one, image(), None, "job-7", IMAGES).await;
    server.save().unwrap();
    found_nothing(&two, IMAGES, "job-7").await;
    assert_eq!(in_use(&two, &image()).await, 0);
    server.restart_from_snapshot().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    // (A snapshot fails while Redis starts again.) Both came back; the image's end, sent
    // again, frees its create.
    loop {
        let pools = two.snapshot().await.unwrap_or_default();
        let of = |key: &SlotKey| pools.iter().find(|p| p.key == *key).map(|p| p.in_use);
        if of(&video()) == Some(1) && of(&image()) == Some(0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "video, image: {:?}, {:?}",
            of(&video()),
            of(&image())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A legacy list page naming `id` under `ext` with `status`, alone (often a legacy list's last
/// page, which keeps ended tasks for days), as the layer or a reconcile observes it on `path`.
async fn listed_alone<B: SlotBackend>(
    backend: &B,
    path: &str,
    id: &str,
    ext: &str,
    status: &str,
) -> Applied {
    let body = serde_json::json!({
        "code": 0,
        "message": "SUCCEED",
        "request_id": "r-1",
        "data": [{
            "task_id": id,
            "task_status": status,
            "task_info": {"external_task_id": ext},
        }],
    })
    .to_string();
    let outcome = Outcome::parse(
        http::StatusCode::OK,
        &http::HeaderMap::new(),
        body.as_bytes(),
        tokio::time::Instant::now(),
    )
    .unwrap();
    assert_eq!(outcome.tasks().len(), 1);
    backend
        .observe_list_on(&account(), &outcome, LEASE, on(path))
        .await
        .unwrap()
}

/// A list page naming one task long ended is no report of that task: its end is not
/// remembered as one that overtook a create's answer, so a later video create under the same
/// external id (another path's create may carry it) whose answer is lost keeps its slot while
/// its task runs. A query's answer naming that task alone is a report of it, and frees such a
/// create (the negative control). (As kling-concurrency's
/// `a_one_entry_list_page_of_an_ended_task_frees_no_later_create_under_its_external_id`.)
async fn a_one_entry_list_page<B: SlotBackend>([one, two]: [B; 2]) {
    let listed = listed_alone(&two, IMAGES, "old-image-0", "job-0", "succeed").await;
    assert!(listed.released.is_empty(), "{listed:?}");
    create(&one, video(), None, "job-0", TEXT2VIDEO).await;
    assert_eq!(in_use(&one, &video()).await, 1, "the listed end freed it");

    let queried = queried(
        &two,
        IMAGES,
        "old-image-1",
        "old-image-1",
        "job-1",
        "succeed",
    )
    .await;
    assert!(queried.released.is_empty(), "{queried:?}");
    create(&one, video(), None, "job-1", TEXT2VIDEO).await;
    assert_eq!(
        in_use(&one, &video()).await,
        1,
        "the queried end is remembered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_entry_list_page_of_an_ended_task_frees_no_later_create_under_its_external_id() {
    both!(2, a_one_entry_list_page);
}

/// Runs one maintenance pass of `backend`, waiting for Redis to come back first.
async fn maintained(backend: &RedisSlots) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = backend.maintain().await {
        assert!(tokio::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A list page's end of a task held nowhere, sent again with the process's recent ends after
/// Redis lost its state, is still no report of that task: a later create of unknown outcome
/// under its external id keeps its slot. A query's end of a task held nowhere, sent again, is
/// noted as when first reported, and frees such a create (the negative control: the ends were
/// sent again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_end_sent_again_after_a_restart_frees_no_later_create_under_its_external_id() {
    let Some(mut server) = redis() else { return };
    let one = process(&server, 2).await;
    let two = process(&server, 2).await;
    let listed = listed_alone(&two, IMAGES, "old-image-0", "job-0", "succeed").await;
    assert!(listed.released.is_empty(), "{listed:?}");
    let queried = queried(
        &two,
        IMAGES,
        "old-image-1",
        "old-image-1",
        "job-1",
        "succeed",
    )
    .await;
    assert!(queried.released.is_empty(), "{queried:?}");
    server.stop();
    server.restart().unwrap();
    // The lister's passes: the new generation, and its ends sent again.
    maintained(&two).await;
    maintained(&two).await;
    maintained(&one).await;
    create(&one, video(), None, "job-0", TEXT2VIDEO).await;
    assert_eq!(
        in_use(&one, &video()).await,
        1,
        "the listed end, sent again, freed it"
    );
    create(&one, video(), None, "job-1", TEXT2VIDEO).await;
    assert_eq!(
        in_use(&one, &video()).await,
        1,
        "the queried end, sent again, is remembered"
    );
}

/// A list page's end that released a task another process held, sent again after Redis
/// restarted empty before that process's next pass, is noted: the owner's registration of
/// the task finds it ended and gives its slot back (its lease is long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_end_that_released_a_holding_is_noted_when_sent_again_after_a_restart() {
    let Some(mut server) = redis() else { return };
    // (No pass but those the test runs: the owner must not learn of the release first.)
    let one = process(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    let two = process(&server, 2)
        .await
        .maintain_every(Duration::from_secs(60));
    create(&one, video(), Some("t1"), "job-1", TEXT2VIDEO).await;
    let listed = listed_alone(&two, TEXT2VIDEO, "t1", "job-1", "succeed").await;
    assert_eq!(tasks(&listed), ["t1"]);
    assert_eq!(one.held_here(), 1, "the owner has not seen the release");
    server.stop();
    server.restart().unwrap();
    maintained(&two).await;
    maintained(&two).await;
    maintained(&one).await;
    maintained(&one).await;
    assert_eq!(one.held_here(), 0, "t1 ended");
    assert_eq!(in_use(&one, &video()).await, 0);
}
