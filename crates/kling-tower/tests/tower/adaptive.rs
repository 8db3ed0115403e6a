//! The adaptive rate of the stack ([`StackConfig::adaptive_rate`]): told a rate 1.5 times the
//! account's, the stack slows to the account's after a few 1302s (on by default under a rate
//! cap); with it off, the negative control, it meets a 1302 on a large share of its requests.

use std::time::Duration;

use kling_core::Outcome;
use kling_mock::{MockConfig, MockKling, Preset, Stats};
use kling_tower::{Credentials, KlingLayer, StackConfig, Tier};
use tower::{Layer, ServiceExt};

use crate::support::{accepted_create, request};

const KEY: &str = "adaptive-key";
/// Workers sending queries back to back, and the queries each sends.
const WORKERS: usize = 6;
const QUERIES_EACH: usize = 50;

/// The Pro mock (60 requests a minute), with one task that the queries read.
fn pro_mock() -> MockKling {
    MockKling::new(
        MockConfig::preset(Preset::Pro)
            .unlimited_credits()
            .seed(0xada)
            .api_key(KEY),
    )
    .unwrap()
}

/// `WORKERS × QUERIES_EACH` queries of one task, each worker sending its next as soon as the
/// last is answered, through a Pro stack told 90 requests a minute (1.5 times the mock's 60);
/// the mock's counts, and how many queries failed.
async fn queries_told_one_and_a_half_times(config: StackConfig) -> (Stats, usize) {
    let mock = pro_mock();
    let kling = KlingLayer::new(
        config.rate_per_minute(90.0),
        Credentials::api_key(KEY).unwrap(),
    )
    .unwrap();
    let service = kling.layer(mock.clone());
    let created = accepted_create(service.clone()).await;
    let task = Outcome::of(&created).unwrap().task().unwrap().id.clone();
    let uri = format!("/v1/videos/text2video/{task}");
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (service, uri) = (service.clone(), uri.clone());
            tokio::spawn(async move {
                let mut failed = 0;
                for _ in 0..QUERIES_EACH {
                    let answer = service.clone().oneshot(request("GET", &uri, "")).await;
                    if !answer.is_ok_and(|r| Outcome::of(&r).is_some_and(|o| o.is_success())) {
                        failed += 1;
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for worker in workers {
        failed += worker.await.unwrap();
    }
    (mock.stats(), failed)
}

fn share_1302(stats: &Stats) -> f64 {
    let refused = stats.responses_by_code.get("1302").copied().unwrap_or(0);
    refused as f64 / stats.requests_total as f64
}

#[tokio::test(start_paused = true)]
async fn told_one_and_a_half_times_the_rate_the_stack_slows_to_the_accounts() {
    let started = tokio::time::Instant::now();
    let (on, failed) = queries_told_one_and_a_half_times(StackConfig::preset(Tier::Pro)).await;
    let took = started.elapsed();
    assert_eq!(failed, 0, "{on:?}");
    // A few 1302s while it learns the account's rate from the 90 a minute it was told, then
    // about one in forty as it probes upward (kling-ratelimit's `Adaptive`): 2-3%.
    let share = share_1302(&on);
    assert!(share > 0.0 && share < 0.05, "{share}: {on:?}");
    // And about as fast as the account allows: 301 requests at 60 a minute take five minutes.
    assert!(took < Duration::from_secs(330), "{took:?}");

    // The negative control: the same queries with the adaptive rate off meet a 1302 on a large
    // share of their requests. Each 1302 pauses the account and the next request succeeds,
    // which ends the streak, and the stack goes back to 90 a minute.
    let (off, _) =
        queries_told_one_and_a_half_times(StackConfig::preset(Tier::Pro).adaptive_rate(false))
            .await;
    let share = share_1302(&off);
    assert!(share > 0.2, "{share}: {off:?}");
}

/// At the account's true rate the adaptive rate changes nothing: the same requests at the same
/// instants, with it on and off, and no 1302.
#[tokio::test(start_paused = true)]
async fn at_the_accounts_rate_the_adaptive_rate_changes_nothing() {
    let mut runs = Vec::new();
    for on in [true, false] {
        let mock = pro_mock();
        let config = StackConfig::preset(Tier::Pro).adaptive_rate(on);
        assert_eq!(config.adapts_rate(), on);
        let kling = KlingLayer::new(config, Credentials::api_key(KEY).unwrap()).unwrap();
        let service = kling.layer(mock.clone());
        let started = tokio::time::Instant::now();
        let created = accepted_create(service.clone()).await;
        let task = Outcome::of(&created).unwrap().task().unwrap().id.clone();
        let uri = format!("/v1/videos/text2video/{task}");
        let queries: Vec<_> = (0..40)
            .map(|_| tokio::spawn(service.clone().oneshot(request("GET", &uri, ""))))
            .collect();
        for query in queries {
            query.await.unwrap().unwrap();
        }
        let stats = mock.stats();
        assert_eq!(stats.responses_by_code.get("1302"), None, "{stats:?}");
        runs.push((stats.requests_total, started.elapsed()));
    }
    assert_eq!(runs[0], runs[1]);
}
