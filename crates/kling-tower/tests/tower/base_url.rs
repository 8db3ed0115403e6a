use std::convert::Infallible;

use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_core::{ClassifyLayer, Outcome, TaskStatus};
use kling_mock::{MockConfig, MockServer, Preset};
use kling_tower::auth::{AuthLayer, Credentials};
use kling_tower::base_url::BaseUrlLayer;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};

use crate::support::request;

async fn resolved(base: &str, uri: &str) -> String {
    let echo =
        service_fn(
            |req: http::Request<()>| async move { Ok::<_, Infallible>(req.uri().to_string()) },
        );
    BaseUrlLayer::new(base)
        .unwrap()
        .layer(echo)
        .oneshot(http::Request::get(uri).body(()).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn relative_uris_are_resolved_and_absolute_ones_kept() {
    let global = "https://api-singapore.klingai.com";
    assert_eq!(
        resolved(global, "/v1/videos/text2video").await,
        "https://api-singapore.klingai.com/v1/videos/text2video"
    );
    assert_eq!(
        resolved("http://proxy:8080/kling/", "/tasks?task_ids=a,b").await,
        "http://proxy:8080/kling/tasks?task_ids=a,b"
    );
    assert_eq!(
        resolved(global, "http://127.0.0.1:9/v1/x").await,
        "http://127.0.0.1:9/v1/x"
    );
    for bad in [
        "api.klingai.com",
        "ftp://host",
        "http://host/?q=1",
        "not a url",
    ] {
        let err = BaseUrlLayer::new(bad).unwrap_err();
        assert_eq!(err.field(), "base_url", "{bad}");
    }
    let _ = (BaseUrlLayer::global(), BaseUrlLayer::china());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_client_reaches_the_mock_through_the_base_url() {
    let server = MockServer::start(MockConfig::preset(Preset::Pro).no_rate_limit())
        .await
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let service = ServiceBuilder::new()
        .layer(AuthLayer::new(Credentials::api_key("k1").unwrap()))
        .layer(ClassifyLayer::new())
        .layer(BaseUrlLayer::new(&server.base_url()).unwrap())
        .service(client);
    let created = service
        .clone()
        .oneshot(request(
            "POST",
            "/v1/videos/text2video",
            r#"{"prompt":"a cat"}"#,
        ))
        .await
        .unwrap();
    let task = Outcome::of(&created).unwrap().task().unwrap().clone();
    assert_eq!(task.status, TaskStatus::Submitted);
    let queried = service
        .oneshot(request(
            "GET",
            &format!("/v1/videos/text2video/{}", task.id),
            "",
        ))
        .await
        .unwrap();
    assert_eq!(Outcome::of(&queried).unwrap().task().unwrap().id, task.id);
    assert_eq!(server.stats().requests_total, 2);
    assert_eq!(server.stats().tasks_created, 1);
}

#[cfg(feature = "hyper")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_client_also_speaks_plain_http_to_the_mock() {
    let server = MockServer::start(MockConfig::preset(Preset::Pro))
        .await
        .unwrap();
    let client = kling_tower::client::https_client().unwrap();
    let service = ServiceBuilder::new()
        .layer(AuthLayer::new(Credentials::api_key("k1").unwrap()))
        .layer(ClassifyLayer::new())
        .layer(BaseUrlLayer::new(&server.base_url()).unwrap())
        .service(client);
    let response = service
        .oneshot(request("GET", "/account/costs", ""))
        .await
        .unwrap();
    assert!(Outcome::of(&response).unwrap().is_success());
}
