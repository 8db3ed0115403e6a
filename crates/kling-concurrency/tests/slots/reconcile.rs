//! `reconcile()` against the in-process mock Kling, in paused time.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use kling_concurrency::{Reconcile, SlotsConfig, TaskSlotsLayer};
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
