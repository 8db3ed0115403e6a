//! `SlotsConfig::pool_scope` against the in-process mock Kling counting slots per product (every
//! model and the legacy endpoints in one `video` pool), in paused time.

use std::time::Duration;

use kling_concurrency::{SlotsConfig, SlotsHandle, TaskSlots, TaskSlotsLayer};
use kling_core::{AccountId, Outcome, Pool, PoolScope, Product};
use kling_mock::{MockConfig, MockKling, Preset};
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};

use crate::mock::{Client, client, send};
use crate::support::post;

const TASK: Duration = Duration::from_secs(600);

/// Two new-style models and the legacy endpoint: three pools per model, one per product.
const PATHS: [&str; 3] = [
    "/text-to-video/kling-3.0",
    "/text-to-video/kling-2.6",
    "/v1/videos/text2video",
];

/// A mock whose account runs two video tasks at once, whatever their models.
fn mock() -> MockKling {
    MockKling::new(
        MockConfig::preset(Preset::Pro)
            .no_rate_limit()
            .slots(2)
            .pool_scope(kling_mock::PoolScope::Product)
            .task_duration(TASK, TASK),
    )
    .unwrap()
}

fn slots(mock: &MockKling, scope: PoolScope) -> (TaskSlots<Client>, SlotsHandle) {
    let config = SlotsConfig::new(2)
        .pool_scope(scope)
        .default_account(AccountId::new("key"));
    let (layer, handle) = TaskSlotsLayer::pair(config).unwrap();
    (layer.layer(client(mock)), handle)
}

fn create(path: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    post(path, r#"{"prompt":"x"}"#)
}

#[tokio::test(start_paused = true)]
async fn counted_per_product_a_third_model_waits_for_a_slot_instead_of_meeting_a_1303() {
    let mock = mock();
    let (mut svc, handle) = slots(&mock, PoolScope::Product);
    for path in &PATHS[..2] {
        let response = send(&mut svc, create(path)).await;
        assert!(Outcome::of(&response).unwrap().is_success());
    }
    let mut third = spawn(svc.ready().await.unwrap().call(create(PATHS[2])));
    assert_pending!(third.poll());
    let snapshot = handle.snapshot().await.unwrap();
    let key = AccountId::new("key");
    assert_eq!(
        snapshot
            .get(&key, &Pool::new(Product::Video))
            .unwrap()
            .in_use,
        2
    );
    assert!(
        snapshot
            .get(&key, &Pool::with_model(Product::Video, "kling-3.0"))
            .is_none()
    );

    // The two tasks end; a list through the layer says so, and the third goes.
    tokio::time::advance(TASK + Duration::from_secs(1)).await;
    send(&mut svc, post("/tasks", "{}")).await;
    let response = assert_ready_ok!(third.poll());
    assert!(Outcome::of(&response).unwrap().is_success());
    let stats = mock.stats();
    assert_eq!(stats.tasks_created, 3);
    assert_eq!(stats.responses_by_code.get("1303"), None);
}

/// The control: counted per model, as by default, the same three creates are all sent, and the
/// mock refuses the third.
#[tokio::test(start_paused = true)]
async fn counted_per_model_against_an_account_counting_per_product_the_third_create_meets_a_1303() {
    let mock = mock();
    let (mut svc, _handle) = slots(&mock, PoolScope::Model);
    for path in PATHS {
        send(&mut svc, create(path)).await;
    }
    let stats = mock.stats();
    assert_eq!(stats.tasks_created, 2);
    assert_eq!(stats.responses_by_code.get("1303"), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn counted_per_product_reconcile_adopts_a_models_task_into_the_products_pool() {
    let mock = mock();
    let mut bare = client(&mock);
    send(&mut bare, create(PATHS[0])).await;
    let (_svc, handle) = slots(&mock, PoolScope::Product);
    let kling3 = Pool::with_model(Product::Video, "kling-3.0");
    let plan = kling_concurrency::Reconcile::new("").new_style("text-to-video", kling3.clone());
    let found = handle.reconcile(&mut bare, &plan).await.unwrap();
    assert_eq!((found.unfinished, found.adopted), (1, 1));
    let snapshot = handle.snapshot().await.unwrap();
    let key = AccountId::new("key");
    let video = snapshot.get(&key, &Pool::new(Product::Video)).unwrap();
    assert_eq!(video.in_use, 1);
    assert!(snapshot.get(&key, &kling3).is_none());
}
