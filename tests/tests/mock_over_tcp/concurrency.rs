use std::time::Duration;

use http::Method;
use kling_core::{Code, Disposition};
use kling_mock::{MockConfig, MockServer, Preset};

use crate::support::{client, send, wait_until_ended};

const VIDEO: &str = "/v1/videos/text2video";

#[tokio::test]
async fn the_sixth_concurrent_create_on_pro_gets_1303_and_succeeds_once_a_task_ends() {
    // Tasks of 60 s at 100x speed: 0.6 s of real time each.
    let config = MockConfig::preset(Preset::Pro)
        .no_rate_limit()
        .speed(100.0)
        .task_duration(Duration::from_secs(60), Duration::from_secs(60));
    let mock = MockServer::start(config).await.unwrap();
    let base = mock.base_url();
    let http = client();

    let mut ids = Vec::new();
    for _ in 0..5 {
        let (_, outcome) = send(
            &http,
            Method::POST,
            format!("{base}{VIDEO}"),
            "k",
            r#"{"prompt":"p"}"#,
        )
        .await
        .unwrap();
        assert!(outcome.is_success(), "{:?}", outcome.to_result());
        ids.push(outcome.task().unwrap().id.clone());
    }
    let (response, outcome) = send(
        &http,
        Method::POST,
        format!("{base}{VIDEO}"),
        "k",
        r#"{"prompt":"p"}"#,
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(outcome.code(), Code::ParallelTaskLimit);
    assert_eq!(outcome.disposition(), Disposition::WaitForSlot);
    assert!(outcome.tasks().is_empty(), "a 1303 carries no data");

    wait_until_ended(&http, &base, VIDEO, &ids[0], Duration::from_secs(5)).await;
    let (_, outcome) = send(
        &http,
        Method::POST,
        format!("{base}{VIDEO}"),
        "k",
        r#"{"prompt":"p"}"#,
    )
    .await
    .unwrap();
    assert!(outcome.is_success(), "{:?}", outcome.to_result());
    assert_eq!(mock.stats().max_concurrent.get("video"), Some(&5));
}

#[tokio::test]
async fn an_image_create_with_n_4_takes_4_of_the_image_slots() {
    let config = MockConfig::preset(Preset::Pro).no_rate_limit().speed(10.0);
    let mock = MockServer::start(config).await.unwrap();
    let base = mock.base_url();
    let http = client();
    let url = format!("{base}/v1/images/generations");

    let (_, four) = send(
        &http,
        Method::POST,
        url.clone(),
        "k",
        r#"{"prompt":"p","n":4}"#,
    )
    .await
    .unwrap();
    assert!(four.is_success());
    // 4 of 5 slots are taken: n = 2 does not fit, n = 1 does.
    let (_, two) = send(
        &http,
        Method::POST,
        url.clone(),
        "k",
        r#"{"prompt":"p","n":2}"#,
    )
    .await
    .unwrap();
    assert_eq!(two.code(), Code::ParallelTaskLimit);
    let (_, one) = send(&http, Method::POST, url, "k", r#"{"prompt":"p","n":1}"#)
        .await
        .unwrap();
    assert!(one.is_success());
    assert_eq!(mock.stats().in_use.get("image"), Some(&5));
    // The video pool is separate.
    let (_, video) = send(
        &http,
        Method::POST,
        format!("{base}{VIDEO}"),
        "k",
        r#"{"prompt":"p"}"#,
    )
    .await
    .unwrap();
    assert!(video.is_success());
}
