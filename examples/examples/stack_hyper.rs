//! The whole stack in one line on hyper-util's HTTPS client: twenty jobs through the Pro
//! preset against an embedded kling-mock on Pro, at the same speed factor, with no slot
//! refusal (1303) and all five slots in use at the peak.
//!
//! Run: `cargo run -p kling-examples --example stack_hyper`

#![allow(clippy::print_stdout)] // an example reports what it does

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::Outcome;
use kling_core::error::BoxError;
use kling_mock::{MockConfig, MockServer, Preset};
use kling_tower::{Credentials, KlingLayer, StackConfig, TaskRef, Tier};
use tower::{Layer, ServiceExt};

/// Kling time runs this many times faster, on the mock and in the preset alike.
const SPEED: f64 = 30.0;

/// Kling on Pro at the example's speed (its tests' negative control starts the same).
fn mock_config() -> MockConfig {
    MockConfig::preset(Preset::Pro)
        .speed(SPEED)
        .task_duration(Duration::from_secs(20), Duration::from_secs(40))
        .api_key("demo-key")
}

/// A create of job `i`.
fn create_body(i: usize) -> String {
    format!(r#"{{"prompt":"shot {i}"}}"#)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mock = MockServer::start(mock_config()).await?;

    // The one line: Pro numbers at the mock's speed, an API key, the mock as base URL.
    let kling = KlingLayer::builder(
        StackConfig::preset(Tier::Pro).speed(SPEED),
        Credentials::api_key("demo-key")?,
    )
    .base_url(&mock.base_url())
    .build()?;
    let client = kling_tower::client::https_client()?; // rustls (ring); plain http for the mock
    let service = kling.layer(client);
    let follower = kling.follower(service.clone(), kling.follow_policy())?;

    let jobs: Vec<_> = (0..20)
        .map(|i| {
            let (service, follower) = (service.clone(), follower.clone());
            tokio::spawn(async move {
                let create = http::Request::post("/v1/videos/text2video")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(create_body(i))))?;
                let created = service.oneshot(create).await?;
                let task = Outcome::of(&created)
                    .and_then(Outcome::task)
                    .ok_or("no task")?
                    .clone();
                let done = follower
                    .follow(TaskRef::from_report("/v1/videos/text2video", &task))
                    .await?;
                Ok::<_, BoxError>(done)
            })
        })
        .collect();
    for job in jobs {
        let done = job.await??;
        println!("task {} {} {:?}", done.id, done.status, done.urls.first());
    }

    let stats = mock.stats();
    println!("mock: {:?}", stats.responses_by_code);
    println!("usage: {:?}", kling.snapshot().rate);
    assert_eq!(stats.tasks_created, 20);
    assert!(
        !stats.responses_by_code.contains_key("1303"),
        "no slot refusal"
    );
    // The mock refuses a sixth task (a 1303, refused above), so its peak can never show more
    // than 5; what the peak shows is that the stack filled all five slots, not fewer.
    assert_eq!(stats.max_concurrent.get("video"), Some(&5), "{stats:?}");
    kling.drain().await;
    mock.shutdown().await;
    Ok(())
}

#[cfg(test)]
#[path = "support/blind.rs"]
mod blind;

#[cfg(test)]
mod tests {
    use crate::blind::{Create, blind_creates};
    use kling_mock::Preset;
    use kling_tower::Credentials;

    #[test]
    fn runs_to_completion_against_the_mock() {
        super::main().expect("the example finishes without error");
    }

    /// The control of `main`'s "no slot refusal": the same twenty creates sent blind.
    #[test]
    fn the_same_creates_sent_blind_meet_1303() {
        let creates = (0..20)
            .map(|i| Create {
                credentials: Credentials::api_key("demo-key").unwrap(),
                path: "/v1/videos/text2video",
                body: super::create_body(i),
            })
            .collect();
        let stats =
            blind_creates(super::mock_config(), Preset::Pro, super::SPEED, creates).unwrap();
        assert!(stats.responses("1303") >= 5, "{stats:?}");
    }
}
