use std::time::Duration;

use http::Method;
use kling_core::{ApiGeneration, TaskStatus};
use kling_mock::{MockConfig, MockServer, Preset};

use crate::support::{client, send};

#[tokio::test]
async fn one_batch_query_reports_several_tasks_ending() {
    // Tasks of 60 s at 100x: 0.6 s of real time, in which the three creates and the first
    // query below must fit (it sees none ended): room for a stalled thread on a loaded machine.
    let config = MockConfig::preset(Preset::Pro)
        .no_rate_limit()
        .speed(100.0)
        .task_duration(Duration::from_secs(60), Duration::from_secs(60));
    let mock = MockServer::start(config).await.unwrap();
    let base = mock.base_url();
    let http = client();

    let mut ids = Vec::new();
    for i in 0..3 {
        let body = format!(r#"{{"prompt":"p","external_id":"job-{i}"}}"#);
        let (_, outcome) = send(
            &http,
            Method::POST,
            format!("{base}/text-to-video/kling-3.0"),
            "k",
            &body,
        )
        .await
        .unwrap();
        let task = outcome.task().expect("a create reports its task").clone();
        assert_eq!(task.generation, ApiGeneration::New);
        assert_eq!(task.status, TaskStatus::Submitted);
        ids.push(task.id);
    }
    assert_eq!(mock.stats().in_use.get("video:kling-3.0"), Some(&3));

    let query = format!("{base}/tasks?task_ids={}", ids.join(","));
    let (_, outcome) = send(&http, Method::GET, query.clone(), "k", "")
        .await
        .unwrap();
    assert_eq!(outcome.tasks().len(), 3);
    assert!(outcome.tasks().iter().all(|t| !t.status.is_terminal()));

    // The first query came after the last create: all three have ended 0.6 s later.
    tokio::time::sleep(Duration::from_millis(650)).await;
    let (_, outcome) = send(&http, Method::GET, query, "k", "").await.unwrap();
    let ended: Vec<&str> = outcome
        .tasks()
        .iter()
        .filter(|t| t.status.is_terminal())
        .map(|t| t.id.as_str())
        .collect();
    assert_eq!(
        ended.len(),
        3,
        "one response ends all three: {:?}",
        outcome.tasks()
    );
    assert!(
        outcome.tasks().iter().all(|t| t.cost.is_some()),
        "finished tasks report their cost"
    );

    // The same tasks by their external ids.
    let (_, by_external) = send(
        &http,
        Method::GET,
        format!("{base}/tasks?external_task_ids=job-0,job-2"),
        "k",
        "",
    )
    .await
    .unwrap();
    let externals: Vec<_> = by_external
        .tasks()
        .iter()
        .map(|t| t.external_id.clone())
        .collect();
    assert_eq!(externals, vec![Some("job-0".into()), Some("job-2".into())]);
}

#[tokio::test]
async fn legacy_tasks_succeed_with_urls_and_a_duplicate_external_id_is_rejected() {
    let config = MockConfig::preset(Preset::Pro)
        .no_rate_limit()
        .speed(100.0)
        .task_duration(Duration::from_secs(10), Duration::from_secs(10));
    let mock = MockServer::start(config).await.unwrap();
    let base = mock.base_url();
    let http = client();
    let url = format!("{base}/v1/videos/text2video");
    let body = r#"{"prompt":"p","external_task_id":"once"}"#;

    let (_, created) = send(&http, Method::POST, url.clone(), "k", body)
        .await
        .unwrap();
    assert!(created.is_success());
    let (_, again) = send(&http, Method::POST, url.clone(), "k", body)
        .await
        .unwrap();
    assert!(!again.is_success());
    assert_eq!(mock.stats().duplicate_external_ids, 1);
    assert_eq!(mock.stats().tasks_created, 1);

    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, outcome) = send(&http, Method::GET, format!("{url}/once"), "k", "")
        .await
        .unwrap();
    let task = outcome.task().unwrap();
    assert_eq!(task.status, TaskStatus::Succeeded);
    assert_eq!(task.generation, ApiGeneration::Legacy);
    assert_eq!(task.external_id.as_deref(), Some("once"));
    assert!(!task.urls.is_empty());

    let (_, list) = send(
        &http,
        Method::GET,
        format!("{url}?pageNum=1&pageSize=30"),
        "k",
        "",
    )
    .await
    .unwrap();
    assert_eq!(list.tasks().len(), 1);
}
