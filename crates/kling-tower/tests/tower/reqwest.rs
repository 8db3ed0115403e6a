use kling_core::error::SendState;
use kling_core::{ClassifyLayer, Outcome, TaskStatus};
use kling_mock::{MockConfig, MockServer, Preset};
use kling_tower::auth::{AuthLayer, Credentials};
use kling_tower::base_url::BaseUrlLayer;
use kling_tower::client::ReqwestService;
use tower::{ServiceBuilder, ServiceExt};

use crate::support::request;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_adapter_creates_and_queries_against_the_mock() {
    let server = MockServer::start(MockConfig::preset(Preset::Pro).no_rate_limit())
        .await
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(AuthLayer::new(Credentials::api_key("k2").unwrap()))
        .layer(ClassifyLayer::new())
        .layer(BaseUrlLayer::new(&server.base_url()).unwrap())
        .service(ReqwestService::new_client().unwrap());
    let created = service
        .clone()
        .oneshot(request(
            "POST",
            "/text-to-video/kling-3.0",
            r#"{"prompt":"a cat"}"#,
        ))
        .await
        .unwrap();
    let task = Outcome::of(&created).unwrap().task().unwrap().clone();
    assert_eq!(task.status, TaskStatus::Submitted);
    let queried = service
        .oneshot(request("GET", &format!("/tasks?task_ids={}", task.id), ""))
        .await
        .unwrap();
    let outcome = Outcome::of(&queried).unwrap();
    assert!(outcome.is_success());
    assert_eq!(outcome.task().unwrap().id, task.id);
    let stats = server.stats();
    assert_eq!((stats.requests_total, stats.tasks_created), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_never_sent() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let service = ServiceBuilder::new()
        .layer(ClassifyLayer::new())
        .layer(BaseUrlLayer::new(&format!("http://127.0.0.1:{port}")).unwrap())
        .service(ReqwestService::new_client().unwrap());
    let err = service
        .oneshot(request("POST", "/v1/videos/text2video", "{}"))
        .await
        .unwrap_err();
    assert_eq!(SendState::of(&*err), SendState::NotSent, "{err}");
}

/// A create marked HTTP/2, through the whole stack on the client `new_client` builds, to the
/// mock over plain `http://` (so an HTTP/1.1 connection, whichever features reqwest has):
/// hyper-util connects and then refuses it before writing a byte, with its
/// `UserUnsupportedVersion` error, which is no connect error and read as maybe sent (the
/// create held its slot for the 30-minute task lease). It fails as never sent, the mock saw
/// no request, and the slot is free; the same create as HTTP/1.1 is sent (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_create_reqwest_cannot_send_is_never_sent_and_holds_no_slot() {
    use kling_tower::{KlingLayer, StackConfig, Tier};
    use tower::Layer;

    let server = MockServer::start(MockConfig::preset(Preset::Pro).no_rate_limit())
        .await
        .unwrap();
    let config = StackConfig::preset(Tier::Pro).retry_max_attempts(1);
    let kling = KlingLayer::builder(config, Credentials::api_key("k2").unwrap())
        .base_url(&server.base_url())
        .build()
        .unwrap();
    let stack = kling.layer(ReqwestService::new_client().unwrap());
    let create = || request("POST", "/v1/videos/text2video", r#"{"prompt":"a cat"}"#);

    let mut http2 = create();
    *http2.version_mut() = http::Version::HTTP_2;
    let error = stack.clone().oneshot(http2).await.unwrap_err();
    assert_eq!(SendState::of(&*error), SendState::NotSent, "{error:?}");
    assert!(!kling_core::error::may_have_created(&*error), "{error:?}");
    assert_eq!(server.stats().requests_total, 0, "the mock saw no request");
    let snapshot = kling.slots().snapshot().await.unwrap();
    assert!(
        snapshot.pools().iter().all(|p| p.in_use == 0),
        "{snapshot:?}"
    );

    let created = stack.oneshot(create()).await.unwrap();
    assert!(Outcome::of(&created).unwrap().is_success());
    assert_eq!(server.stats().tasks_created, 1);
}
