//! The configuration: durations it accepts, and where a pool's capacity comes from.

use std::time::Duration;

use kling_concurrency::{SlotsConfig, TaskSlotsLayer};
use kling_core::{AccountId, Pool, PoolScope, Product};
use tokio_test::assert_pending;
use tokio_test::task::spawn;
use tower::{Layer, Service, ServiceExt};

use crate::support::*;

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

#[test]
fn a_lease_or_recovery_interval_past_a_year_is_a_configuration_error_naming_it() {
    assert!(SlotsConfig::new(1).lease(YEAR).validate().is_ok());
    assert!(
        SlotsConfig::new(1)
            .recovery_interval(YEAR)
            .validate()
            .is_ok()
    );
    for lease in [YEAR + Duration::from_nanos(1), Duration::MAX] {
        let err = SlotsConfig::new(1).lease(lease).validate().unwrap_err();
        assert_eq!(err.field(), "lease");
        let err = TaskSlotsLayer::new(SlotsConfig::new(1).lease(lease)).unwrap_err();
        assert_eq!(err.field(), "lease");
    }
    let err = SlotsConfig::new(1)
        .recovery_interval(Duration::MAX)
        .validate()
        .unwrap_err();
    assert_eq!(err.field(), "recovery_interval");
    assert!(err.to_string().contains("at most a year"), "{err}");
}

/// Under `PoolScope::Product` a model's pool is never counted in: a capacity set for one is
/// refused, naming it and the product to set instead.
#[test]
fn a_model_pools_capacity_under_product_scope_is_refused_naming_it() {
    let kling3 = Pool::with_model(Product::Video, "kling-3.0");
    let product = || SlotsConfig::new(2).pool_scope(PoolScope::Product);
    assert!(
        product()
            .pool_capacity(Pool::new(Product::Video), 4)
            .validate()
            .is_ok()
    );
    assert!(
        SlotsConfig::new(2)
            .pool_capacity(kling3.clone(), 4)
            .validate()
            .is_ok()
    );
    let err = product()
        .pool_capacity(kling3.clone(), 4)
        .validate()
        .unwrap_err();
    assert_eq!(err.field(), "pool_capacity[video:kling-3.0]");
    assert!(err.to_string().contains("set the product's pool"), "{err}");
    let err = TaskSlotsLayer::new(product().account_capacity(AccountId::new("a"), kling3, 1))
        .unwrap_err();
    assert_eq!(err.field(), "account_capacity[a, video:kling-3.0]");
}

/// A create with the longest lease accepted keeps its slot under it and frees it at the end
/// (no overflow on the way).
#[tokio::test(start_paused = true)]
async fn a_lease_of_a_year_holds_and_ends() {
    let (layer, handle) = TaskSlotsLayer::pair(SlotsConfig::new(1).lease(YEAR)).unwrap();
    let mut svc = layer.layer(Fake::new());
    svc.ready().await.unwrap();
    svc.call(create()).await.unwrap();
    assert_eq!(pool_state(&handle, &video()).await.0, 1);
    tokio::time::advance(YEAR).await;
    assert_eq!(pool_state(&handle, &video()).await.0, 0);
}

fn kling3() -> Pool {
    Pool::with_model(Product::Video, "kling-3.0")
}

fn create_kling3(account: &AccountId) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = post("/text-to-video/kling-3.0", r#"{"prompt":"x"}"#);
    req.extensions_mut().insert(account.clone());
    req
}

/// `(configured, in use)` of `pool` of `account`.
async fn configured(
    handle: &kling_concurrency::SlotsHandle,
    account: &AccountId,
    pool: &Pool,
) -> (u32, u32) {
    let snapshot = handle.snapshot().await.unwrap();
    let p = snapshot.get(account, pool).expect("pool used");
    (p.configured, p.in_use)
}

/// An account's capacity for a product reaches that account's model pools, whether set at run
/// time before the model pool is first used or after, or configured.
#[tokio::test(start_paused = true)]
async fn an_accounts_product_capacity_reaches_its_model_pools() {
    let a = AccountId::new("a");
    let b = AccountId::new("b");
    for when in ["before", "after", "configured"] {
        let mut config = SlotsConfig::new(5);
        if when == "configured" {
            config = config.account_capacity(a.clone(), Pool::new(Product::Video), 1);
        }
        let (layer, handle) = TaskSlotsLayer::pair(config).unwrap();
        let mut svc = layer.layer(Fake::new());
        let set = || handle.set_capacity(Some(&a), Pool::new(Product::Video), 1);
        if when == "before" {
            set().await.unwrap();
        }
        svc.ready().await.unwrap();
        svc.call(create_kling3(&a)).await.unwrap();
        if when == "after" {
            set().await.unwrap();
        }
        assert_eq!(configured(&handle, &a, &kling3()).await, (1, 1), "{when}");
        svc.ready().await.unwrap();
        let mut second = spawn(svc.call(create_kling3(&a)));
        assert_pending!(second.poll(), "{when}: the second create waits");
        // Another account keeps the default.
        svc.ready().await.unwrap();
        svc.call(create_kling3(&b)).await.unwrap();
        assert_eq!(configured(&handle, &b, &kling3()).await, (5, 1), "{when}");
    }
}

/// The lookup order: the account's pool, the account's product, the pool, the product, the
/// default.
#[tokio::test(start_paused = true)]
async fn capacity_is_looked_up_account_first_then_pool_then_product() {
    let a = AccountId::new("a");
    let video = Pool::new(Product::Video);
    let config = SlotsConfig::new(9)
        .pool_capacity(video.clone(), 8)
        .pool_capacity(kling3(), 7)
        .account_capacity(a.clone(), video.clone(), 6);
    assert_eq!(config.capacity_of(&a, &kling3()), 6);
    assert_eq!(config.capacity_of(&AccountId::new("b"), &kling3()), 7);
    let other = Pool::with_model(Product::Video, "kling-2.6");
    assert_eq!(config.capacity_of(&AccountId::new("b"), &other), 8);
    assert_eq!(config.capacity_of(&a, &Pool::new(Product::Image)), 9);
    let config = config.account_capacity(a.clone(), kling3(), 5);
    assert_eq!(config.capacity_of(&a, &kling3()), 5);
    assert_eq!(config.capacity_of(&a, &other), 6);
}
