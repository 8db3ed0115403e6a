//! A stack composed by hand with `ServiceBuilderExt`, one method per layer, in the
//! recommended order — here with five task slots in every pool (the eight jobs are all
//! `kling-3.0` videos, so one pool, `video:kling-3.0`, is used), and without the drain gate
//! and the spend guard, which a hand-made stack may leave out.
//!
//! Run: `cargo run -p kling-examples --example hand_composed`

#![allow(clippy::print_stdout)] // an example reports what it does

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kling_core::Outcome;
use kling_core::error::BoxError;
use kling_mock::{MockConfig, MockServer, Preset};
use kling_tower::concurrency::{SlotsConfig, TaskSlotsLayer};
use kling_tower::metrics::Monitor;
use kling_tower::ratelimit::{Cooldown, GcraLayer, Quota};
use kling_tower::retry::{Backoff, RetryLayer};
use kling_tower::{BaseUrlLayer, Credentials, FollowPolicy, Follower, ServiceBuilderExt, TaskRef};
use tower::{ServiceBuilder, ServiceExt};

const SPEED: f64 = 30.0;

/// Kling on Pro at the example's speed (its tests' negative control starts the same).
fn mock_config() -> MockConfig {
    MockConfig::preset(Preset::Pro)
        .speed(SPEED)
        .task_duration(Duration::from_secs(20), Duration::from_secs(30))
}

/// A create of job `i`.
fn create_body(i: usize) -> String {
    format!(r#"{{"prompt":"take {i}"}}"#)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mock = MockServer::start(mock_config()).await?;

    let monitor = Monitor::builder()
        .rate_quota(60, Duration::from_secs(60).div_f64(SPEED))
        .build()?;
    let (slots, slots_handle) =
        TaskSlotsLayer::pair(SlotsConfig::new(5).lease(Duration::from_secs(60)))?;
    let pacing = GcraLayer::builder(Quota::per_minute(60.0).with_headroom(0.05).scaled(SPEED))
        .cooldown(Cooldown::default().scaled(SPEED))
        .build()?;
    let service = ServiceBuilder::new()
        .kling_metrics(monitor.clone())
        .kling_retry(
            RetryLayer::builder()
                .backoff(Backoff::new().sped_up(SPEED))
                .generate_external_ids(true)
                .build()?,
        )
        .task_slots(slots)
        .gcra(pacing)
        .kling_auth(Credentials::api_key("hand-made")?)
        .attempt_timeout(Duration::from_secs(10))
        .classify()
        .base_url(BaseUrlLayer::new(&mock.base_url())?)
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());

    let follower = Follower::new(service.clone(), FollowPolicy::new().speed(SPEED))?;
    let jobs: Vec<_> = (0..8)
        .map(|i| {
            let (service, follower) = (service.clone(), follower.clone());
            tokio::spawn(async move {
                let create = http::Request::post("/text-to-video/kling-3.0")
                    .body(Full::new(Bytes::from(create_body(i))))?;
                let created = service.oneshot(create).await?;
                let task = Outcome::of(&created)
                    .and_then(Outcome::task)
                    .ok_or("no task")?
                    .clone();
                Ok::<_, BoxError>(
                    follower
                        .follow(TaskRef::from_report("/text-to-video/kling-3.0", &task))
                        .await?,
                )
            })
        })
        .collect();
    for job in jobs {
        let done = job.await??;
        println!("task {} {}", done.id, done.status);
    }
    let snapshot = monitor.snapshot();
    println!("tasks {:?}, 429s {:?}", snapshot.tasks, snapshot.rejections);
    assert_eq!(snapshot.tasks.created, 8);
    let slots = slots_handle.snapshot().await?;
    let pools: Vec<String> = slots
        .pools()
        .iter()
        .map(|p| p.key.pool.to_string())
        .collect();
    assert_eq!(
        pools,
        ["video:kling-3.0"],
        "the model's own pool, and no other"
    );
    assert!(slots.pools().iter().all(|p| p.in_use == 0));
    assert!(!mock.stats().responses_by_code.contains_key("1303"));
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

    /// The control of `main`'s "no 1303": the same eight creates sent blind.
    #[test]
    fn the_same_creates_sent_blind_meet_1303() {
        let creates = (0..8)
            .map(|i| Create {
                credentials: Credentials::api_key("hand-made").unwrap(),
                path: "/text-to-video/kling-3.0",
                body: super::create_body(i),
            })
            .collect();
        let stats =
            blind_creates(super::mock_config(), Preset::Pro, super::SPEED, creates).unwrap();
        assert!(stats.responses("1303") > 0, "{stats:?}");
    }
}
