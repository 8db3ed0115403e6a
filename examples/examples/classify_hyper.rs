//! A create and a poll through hyper-util's client with kling-core's classify step, against an
//! embedded kling-mock: every response arrives with its parsed `Outcome`.
//!
//! Run: `cargo run -p kling-examples --example classify_hyper`

#![allow(clippy::print_stdout)] // an example reports what it does

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_core::error::BoxError;
use kling_core::{ClassifyLayer, Outcome};
use kling_mock::{MockConfig, MockServer, Preset};
use tower::{Layer, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // A Pro account, 600x faster than real time: a one-minute task takes 0.1 s.
    let config = MockConfig::preset(Preset::Pro)
        .speed(600.0)
        .task_duration(Duration::from_secs(60), Duration::from_secs(60));
    let mock = MockServer::start(config).await?;
    let base = mock.base_url();
    let client = ClassifyLayer::new().layer(Client::builder(TokioExecutor::new()).build_http());

    let create = http::Request::post(format!("{base}/v1/videos/text2video"))
        .header("authorization", "Bearer demo-key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"prompt":"a red fox in the snow"}"#,
        )))?;
    let response = client.clone().oneshot(create).await?;
    let outcome = Outcome::of(&response).ok_or("classify attaches an outcome")?;
    outcome.to_result()?;
    let task_id = outcome
        .task()
        .ok_or("a create reports its task")?
        .id
        .clone();
    println!("created task {task_id}");

    loop {
        // Poll just after the task's 0.1 s. At this speed Pro's 60 requests a minute allow one
        // every 1.7 ms, so the polls stay far inside the mock's rate limit.
        tokio::time::sleep(Duration::from_millis(120)).await;
        let query = http::Request::get(format!("{base}/v1/videos/text2video/{task_id}"))
            .header("authorization", "Bearer demo-key")
            .body(Full::new(Bytes::new()))?;
        let response = client.clone().oneshot(query).await?;
        let outcome = Outcome::of(&response).ok_or("classify attaches an outcome")?;
        outcome.to_result()?;
        let task = outcome.task().ok_or("a query reports its task")?;
        println!("task {} is {}", task.id, task.status);
        if task.status.is_terminal() {
            for url in &task.urls {
                println!("result: {url}");
            }
            break;
        }
    }
    mock.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_to_completion_against_the_mock() {
        super::main().expect("the example finishes without error");
    }
}
