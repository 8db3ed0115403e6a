//! The whole stack on a `reqwest::Client`, with an access key and secret key signed into a
//! JWT: ten image jobs (`n` = 2, two slots each) through the Standard preset. They go to the
//! legacy `/v1/images/generations`: a JWT is taken on legacy paths only, and the stack refuses
//! an access key pair's request to a new-style one (`ApiKeyRequired`).
//!
//! Run: `cargo run -p kling-examples --example stack_reqwest`

#![allow(clippy::print_stdout)] // an example reports what it does

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::Outcome;
use kling_core::error::BoxError;
use kling_mock::{MockConfig, MockServer, Preset};
use kling_tower::client::ReqwestService;
use kling_tower::{Credentials, KlingLayer, StackConfig, TaskRef, Tier};
use tower::{Layer, ServiceExt};

const SPEED: f64 = 30.0;

/// Kling on Standard at the example's speed (its tests' negative control starts the same).
fn mock_config() -> MockConfig {
    MockConfig::preset(Preset::Standard)
        .speed(SPEED)
        .task_duration(Duration::from_secs(20), Duration::from_secs(30))
        .access_key("ak-demo", "sk-demo")
}

/// A create of job `i`: two images, so two of the pool's three slots.
fn create_body(i: usize) -> String {
    format!(r#"{{"prompt":"still {i}","n":2}}"#)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mock = MockServer::start(mock_config()).await?;
    let kling = KlingLayer::builder(
        StackConfig::preset(Tier::Standard).speed(SPEED),
        Credentials::access_key("ak-demo", "sk-demo")?,
    )
    .base_url(&mock.base_url())
    .build()?;
    let service = kling.layer(ReqwestService::new_client()?);
    let follower = kling.follower(service.clone(), kling.follow_policy())?;

    let jobs: Vec<_> = (0..10)
        .map(|i| {
            let (service, follower) = (service.clone(), follower.clone());
            tokio::spawn(async move {
                let create = http::Request::post("/v1/images/generations")
                    .body(Full::new(Bytes::from(create_body(i))))?;
                let created = service.oneshot(create).await?;
                let task = Outcome::of(&created)
                    .and_then(Outcome::task)
                    .ok_or("no task")?
                    .clone();
                Ok::<_, BoxError>(
                    follower
                        .follow(TaskRef::from_report("/v1/images/generations", &task))
                        .await?,
                )
            })
        })
        .collect();
    for job in jobs {
        let done = job.await??;
        println!("task {} {}", done.id, done.status);
    }
    let stats = mock.stats();
    println!(
        "mock: {:?}, max concurrent {:?}",
        stats.responses_by_code, stats.max_concurrent
    );
    assert_eq!(stats.tasks_created, 10);
    assert!(!stats.responses_by_code.contains_key("1303"));
    // Three image slots: one two-image task at a time, never two (a second would be the 1303
    // refused above; the mock cannot show more than 3). The peak shows each task took 2 slots.
    assert_eq!(stats.max_concurrent.get("image"), Some(&2), "{stats:?}");
    println!("jwt signed {} time(s)", kling.auth().tokens_signed());
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

    /// The control of `main`'s "no 1303": the same ten two-image creates sent blind.
    #[test]
    fn the_same_creates_sent_blind_meet_1303() {
        let creates = (0..10)
            .map(|i| Create {
                credentials: Credentials::access_key("ak-demo", "sk-demo").unwrap(),
                path: "/v1/images/generations",
                body: super::create_body(i),
            })
            .collect();
        let stats = blind_creates(
            super::mock_config(),
            Preset::Standard,
            super::SPEED,
            creates,
        )
        .unwrap();
        assert!(stats.responses("1303") >= 5, "{stats:?}");
    }
}
