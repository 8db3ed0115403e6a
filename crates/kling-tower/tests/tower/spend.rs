use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::error::NotSent;
use kling_core::{BoxError, ClassifyLayer, Code, Outcome};
use kling_mock::{MockConfig, MockKling, Preset};
use kling_tower::error::BudgetExceeded;
use kling_tower::preset::{StackConfig, Tier};
use kling_tower::spend::{CostTable, SpendGuardLayer};
use tower::{Layer, Service, ServiceExt, service_fn};

use crate::support::request;

fn authed(method: &str, uri: &str, body: &str) -> http::Request<Full<Bytes>> {
    let mut req = request(method, uri, body);
    req.headers_mut()
        .insert("authorization", "Bearer key".parse().unwrap());
    req
}

fn video() -> http::Request<Full<Bytes>> {
    authed("POST", "/v1/videos/text2video", r#"{"prompt":"a cat"}"#)
}

async fn send<S>(svc: &mut S, req: http::Request<Full<Bytes>>) -> Result<Outcome, BoxError>
where
    S: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<Full<Bytes>>,
            Error = BoxError,
        >,
{
    let response = svc.ready().await?.call(req).await?;
    Ok(Outcome::of(&response).unwrap().clone())
}

fn mock(config: MockConfig) -> MockKling {
    MockKling::new(
        config
            .no_rate_limit()
            .task_duration(Duration::from_secs(60), Duration::from_secs(60)),
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn create_past_the_budget_fails_before_reaching_the_server_and_reported_costs_correct_it() {
    let mock = mock(MockConfig::preset(Preset::Pro));
    let guard = SpendGuardLayer::new(10.0, CostTable::new().video(3.0)).unwrap();
    let mut svc = guard.layer(ClassifyLayer::new().layer(mock.clone()));

    let mut ids = Vec::new();
    for _ in 0..3 {
        let outcome = send(&mut svc, video()).await.unwrap();
        ids.push(outcome.task().unwrap().id.clone());
    }
    assert_eq!(guard.committed(None), 9.0);
    let err = send(&mut svc, video()).await.unwrap_err();
    let refused = err.downcast_ref::<BudgetExceeded>().expect("typed error");
    assert_eq!(
        (refused.estimate(), refused.remaining(), refused.budget()),
        (3.0, 1.0, 10.0)
    );
    assert!(
        refused.to_string().starts_with("create refused locally"),
        "{refused}"
    );
    assert_eq!(
        mock.stats().requests_total,
        3,
        "the refused create never left"
    );
    assert_eq!(mock.stats().tasks_created, 3);

    // The tasks end; their queries report 1 credit each, not the estimated 3.
    tokio::time::advance(Duration::from_secs(61)).await;
    for id in &ids {
        let outcome = send(
            &mut svc,
            authed("GET", &format!("/v1/videos/text2video/{id}"), ""),
        )
        .await
        .unwrap();
        assert_eq!(outcome.task().unwrap().cost, Some(1.0));
    }
    assert_eq!(guard.committed(None), 3.0);
    assert_eq!(guard.remaining(None), 7.0);
    send(&mut svc, video()).await.unwrap();
    send(&mut svc, video()).await.unwrap();
    assert!(send(&mut svc, video()).await.is_err());
    assert_eq!(mock.stats().tasks_created, 5);
}

#[tokio::test(start_paused = true)]
async fn image_creates_cost_per_image_times_n() {
    let mock = mock(MockConfig::preset(Preset::Enterprise).slots(20));
    let guard = SpendGuardLayer::new(10.0, CostTable::new().image_per_image(1.0)).unwrap();
    let mut svc = guard.layer(ClassifyLayer::new().layer(mock.clone()));
    let image = |n: u32| {
        authed(
            "POST",
            "/v1/images/generations",
            &format!(r#"{{"prompt":"x","n":{n}}}"#),
        )
    };
    send(&mut svc, image(4)).await.unwrap();
    assert_eq!(guard.committed(None), 4.0);
    let err = send(&mut svc, image(9)).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<BudgetExceeded>().unwrap().estimate(),
        9.0
    );
    send(&mut svc, image(6)).await.unwrap();
    assert_eq!(guard.remaining(None), 0.0);
    assert_eq!(mock.stats().tasks_created, 2);
}

#[tokio::test(start_paused = true)]
async fn a_create_the_server_refuses_gives_its_estimate_back() {
    let mock = mock(MockConfig::preset(Preset::Pro).slots(1));
    let guard = SpendGuardLayer::new(5.0, CostTable::new()).unwrap();
    let mut svc = guard.layer(ClassifyLayer::new().layer(mock));
    send(&mut svc, video()).await.unwrap();
    let refused = send(&mut svc, video()).await.unwrap();
    assert_eq!(refused.code(), Code::ParallelTaskLimit);
    assert_eq!(guard.committed(None), 1.0);

    // A request that was never sent gives it back too; an unknown outcome keeps it.
    let guard = SpendGuardLayer::new(5.0, CostTable::new()).unwrap();
    let mut never_sent = guard.layer(service_fn(|_req: http::Request<Full<Bytes>>| async {
        Err::<http::Response<Full<Bytes>>, BoxError>(Box::new(NotSent::new("connection refused")))
    }));
    assert!(send(&mut never_sent, video()).await.is_err());
    assert_eq!(guard.committed(None), 0.0);
    let mut lost = guard.layer(service_fn(|_req: http::Request<Full<Bytes>>| async {
        Err::<http::Response<Full<Bytes>>, BoxError>("connection reset".into())
    }));
    assert!(send(&mut lost, video()).await.is_err());
    assert_eq!(guard.committed(None), 1.0);
}

#[tokio::test(start_paused = true)]
async fn the_budget_starts_again_each_period() {
    let mock = mock(MockConfig::preset(Preset::Pro));
    let guard =
        SpendGuardLayer::with_period(2.0, Duration::from_secs(3600), CostTable::new()).unwrap();
    let mut svc = guard.layer(ClassifyLayer::new().layer(mock));
    send(&mut svc, video()).await.unwrap();
    send(&mut svc, video()).await.unwrap();
    let err = send(&mut svc, video()).await.unwrap_err();
    let refused = err.downcast_ref::<BudgetExceeded>().unwrap();
    assert_eq!(refused.resets_in(), Duration::from_secs(3600));
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(guard.remaining(None), 2.0);
    send(&mut svc, video()).await.unwrap();
}

#[test]
fn the_free_tier_guards_66_credits_a_day_and_others_none() {
    let guard = SpendGuardLayer::from_config(&StackConfig::preset(Tier::Free), CostTable::new())
        .unwrap()
        .expect("free has a budget");
    assert_eq!(guard.budget(), 66.0);
    let none =
        SpendGuardLayer::from_config(&StackConfig::preset(Tier::Pro), CostTable::new()).unwrap();
    assert!(none.is_none());
    let err = SpendGuardLayer::new(f64::NAN, CostTable::new()).unwrap_err();
    assert_eq!(err.field(), "daily_credits");
    let err = SpendGuardLayer::new(1.0, CostTable::new().video(-1.0)).unwrap_err();
    assert_eq!(err.field(), "costs.video");
}
