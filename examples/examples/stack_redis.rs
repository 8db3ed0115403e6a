//! One account, two processes, one Redis: two `KlingLayer` stacks (standing for two worker
//! processes, each with its own Redis connection and HTTP client) share the Pro account's 5
//! task slots and 60 requests a minute through Redis, against an embedded kling-mock on Pro at
//! the same speed factor. Twenty jobs, no 1303, never more than 5 tasks at once.
//!
//! Starts a throw-away `redis-server` (kling-redis's `testing` feature; Debian package
//! `redis-server`); without one it says so and exits (on CI, `CI=true`, it fails instead).
//! With your own Redis, connect to its URL instead.
//!
//! Run: `cargo run -p kling-examples --example stack_redis`

#![allow(clippy::print_stdout)] // an example reports what it does

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::error::BoxError;
use kling_core::{Outcome, Pool};
use kling_mock::{MockConfig, MockServer, Preset};
use kling_redis::testing::RedisServer;
use kling_tower::redis::{Connection, RedisConfig, WhenUnreachable};
use kling_tower::{Credentials, KlingLayer, StackConfig, TaskRef, Tier};
use tower::{Layer, ServiceExt};

/// Kling time runs this many times faster, on the mock and in the preset alike.
const SPEED: f64 = 30.0;
/// Jobs per process.
const JOBS_EACH: usize = 10;

/// Kling on Pro at the example's speed (its tests' negative control starts the same).
fn mock_config() -> MockConfig {
    MockConfig::preset(Preset::Pro)
        .speed(SPEED)
        .task_duration(Duration::from_secs(12), Duration::from_secs(18))
        .api_key("demo-key")
}

/// A create of `process`'s job `i`.
fn create_body(process: usize, i: usize) -> String {
    format!(r#"{{"prompt":"process {process}, shot {i}"}}"#)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let Some(redis) = RedisServer::start_or_skip()? else {
        println!("no redis-server on this machine: nothing to show");
        return Ok(());
    };
    let mock = MockServer::start(mock_config()).await?;
    println!("redis at {}, mock at {}", redis.url(), mock.base_url());

    // Each "process" builds the same one-line stack, plus `.shared(connection)`: its rate
    // limiter and task slots keep their state in Redis under the key prefix, keyed by the
    // account the API key derives. While Redis is unreachable, requests wait (fail closed).
    let redis_config = RedisConfig::new(redis.url()).prefix("kling:example");
    let mut workers = Vec::new();
    for process in 0..2 {
        let connection = Connection::connect(redis_config.clone()).await?;
        let kling = KlingLayer::builder(
            StackConfig::preset(Tier::Pro).speed(SPEED),
            Credentials::api_key("demo-key")?,
        )
        .base_url(&mock.base_url())
        .shared(connection)
        .when_unreachable(WhenUnreachable::Wait)
        .build()?;
        let service = kling.layer(kling_tower::client::https_client()?);
        let follower = kling.follower(service.clone(), kling.follow_policy())?;

        let jobs: Vec<_> = (0..JOBS_EACH)
            .map(|i| {
                let (service, follower) = (service.clone(), follower.clone());
                tokio::spawn(async move {
                    let create = http::Request::post("/v1/videos/text2video")
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(create_body(process, i))))?;
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
        workers.push((process, kling, jobs));
    }

    for (process, _, jobs) in &mut workers {
        for job in jobs.drain(..) {
            let done = job.await??;
            println!("process {process}: task {} {}", done.id, done.status);
        }
    }

    // The account's slots as Redis holds them, read through either process's handle.
    let (_, kling, _) = &workers[0];
    let slots = kling.slots().snapshot().await?;
    let video = slots
        .get(kling.account_id(), &Pool::parse("video").ok_or("pool")?)
        .ok_or("no video pool in Redis")?;
    println!(
        "redis: video slots in use {} of {}",
        video.in_use, video.capacity
    );
    // The other process's snapshot shows the fleet's pools too (read from Redis first).
    let (_, other, _) = &workers[1];
    let usage = other.refreshed_snapshot().await;
    println!(
        "snapshot of process 1: video {:?}",
        usage.pool("video").map(|p| (p.in_use, p.capacity))
    );

    let stats = mock.stats();
    let peak = stats.max_concurrent.get("video").copied().unwrap_or(0);
    println!(
        "mock: {:?}, peak tasks at once {peak}",
        stats.responses_by_code
    );
    assert_eq!(stats.tasks_created, 2 * JOBS_EACH as u64);
    // The two processes together stay within Pro's 5 slots: the mock refuses a sixth task
    // with 1303 (so its `peak` can never show more than 5, and checking it would prove
    // nothing); no 1303 is the check, and its control below meets them.
    assert!(
        !stats.responses_by_code.contains_key("1303"),
        "no slot refusal"
    );
    assert_eq!(video.in_use, 0, "every slot was given back");
    for (_, kling, _) in &workers {
        kling.drain().await;
    }
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

    /// The control of `main`'s "no slot refusal": both processes' creates sent blind by one
    /// client (no Redis needed: nothing is shared).
    #[test]
    fn the_same_creates_sent_blind_meet_1303() {
        let creates = (0..2)
            .flat_map(|process| (0..super::JOBS_EACH).map(move |i| (process, i)))
            .map(|(process, i)| Create {
                credentials: Credentials::api_key("demo-key").unwrap(),
                path: "/v1/videos/text2video",
                body: super::create_body(process, i),
            })
            .collect();
        let stats =
            blind_creates(super::mock_config(), Preset::Pro, super::SPEED, creates).unwrap();
        assert!(stats.responses("1303") >= 5, "{stats:?}");
    }
}
