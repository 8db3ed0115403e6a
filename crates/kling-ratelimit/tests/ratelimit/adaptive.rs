//! Adaptive rate against the in-process mock, whose limit the test hides: a fixed list of limits
//! across the range, so every run checks the same ones.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use kling_core::{ClassifyLayer, Code, Outcome};
use kling_mock::{MockConfig, MockKling, Preset};
use kling_ratelimit::{Adaptive, GcraLayer, Quota};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

fn create() -> http::Request<Full<Bytes>> {
    http::Request::post("/v1/videos/text2video")
        .header("authorization", "Bearer key")
        .body(Full::new(Bytes::from_static(br#"{"prompt":"a cat"}"#)))
        .unwrap()
}

/// Hidden limits (requests a minute) across the range the adaptive mode is built for, its
/// edges included; fixed, so every run checks the same ones (house rule: layer tests are
/// deterministic). Round numbers and ones that fall between the adaptive steps.
const HIDDEN_LIMITS: [f64; 8] = [20.0, 23.7, 37.5, 51.3, 60.0, 78.9, 101.4, 119.9];

#[tokio::test(start_paused = true)]
async fn adaptive_mode_converges_near_a_hidden_limit_without_a_refusal_storm() {
    for hidden in HIDDEN_LIMITS {
        converges_near(hidden).await;
    }
}

/// Four workers of 200 creates each against a mock with `hidden` as its rate; the client
/// only knows a ceiling far above.
async fn converges_near(hidden: f64) {
    let context = format!("hidden limit {hidden:.1}/min");

    let mock = MockKling::new(
        MockConfig::preset(Preset::Pro)
            .rate_per_minute(hidden)
            .slots(100_000),
    )
    .unwrap();
    // The client only knows a ceiling far above, and starts conservatively.
    let layer = GcraLayer::builder(Quota::per_minute(600.0))
        .adaptive(Adaptive::new().start(Quota::per_minute(10.0)))
        .build()
        .unwrap();
    let service = layer.layer(ClassifyLayer::new().layer(mock.clone()));

    let log: Arc<Mutex<Vec<(Instant, Code)>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let service = service.clone();
        let log = Arc::clone(&log);
        workers.push(tokio::spawn(async move {
            for _ in 0..200 {
                let response = service.clone().oneshot(create()).await.unwrap();
                let code = Outcome::of(&response).unwrap().code();
                log.lock().unwrap().push((Instant::now(), code));
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let log = log.lock().unwrap();
    let refused_total = log.iter().filter(|(_, c)| *c == Code::RateLimited).count();
    assert!(
        refused_total * 20 <= log.len(),
        "{refused_total} refusals of {}; {context}",
        log.len()
    );

    // After warming up: throughput within 10% of the hidden limit, refusals rare and isolated.
    let steady = &log[300..];
    let span = steady.last().unwrap().0 - steady.first().unwrap().0;
    let ok = steady.iter().filter(|(_, c)| *c == Code::Success).count();
    let per_minute = (ok - 1) as f64 / span.as_secs_f64() * 60.0;
    assert!(per_minute >= 0.9 * hidden, "{per_minute:.1}/min; {context}");
    assert!(
        per_minute <= hidden * 1.001,
        "{per_minute:.1}/min; {context}"
    );
    let refused = steady.len() - ok;
    assert!(
        refused * 25 <= steady.len(),
        "{refused} refusals in {}; {context}",
        steady.len()
    );
    let in_a_row = steady
        .windows(2)
        .filter(|w| w[0].1 == Code::RateLimited && w[1].1 == Code::RateLimited)
        .count();
    assert_eq!(in_a_row, 0, "two refusals in a row; {context}");
}

/// The adaptive rate is per key: a 1302 of account `b` (another account, its own limit) leaves
/// account `a`'s rate where it was, and lowers `b`'s alone.
#[tokio::test(start_paused = true)]
async fn a_1302_of_another_account_leaves_this_accounts_rate_alone() {
    use kling_core::AccountId;
    use kling_ratelimit::BucketKey;

    use crate::support::{Reply, Server, request};

    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .adaptive(Adaptive::new().start(Quota::per_second(4.0)))
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let rate = |account: &str| {
        let key = BucketKey::account(Some(AccountId::new(account)));
        handle
            .backend()
            .key_state(&key)
            .unwrap()
            .adaptive_rate
            .unwrap()
    };
    for account in ["a", "b"] {
        service
            .clone()
            .oneshot(request(Some(account), "x"))
            .await
            .unwrap();
    }
    let (a, b) = (rate("a"), rate("b"));
    assert!(a > 4.0 && b > 4.0, "slow start: {a} {b}");
    server.script([Reply::throttled()]);
    service
        .clone()
        .oneshot(request(Some("b"), "x"))
        .await
        .unwrap();
    assert_eq!(rate("a"), a);
    assert_eq!(rate("b"), b * 0.85);
}

/// How long the adaptive rate of a key with a 4/s ceiling, starting there, takes to climb
/// back to `share` of the ceiling after a run of `throttles` 1302s (each for a request sent
/// after the previous pause, as a server that refuses every request for a while answers),
/// under a steady load of one request after another: from the first request sent after the
/// run (the first success) to the success that brings the rate back, and the successes it
/// took. `None` when 1,000 successes were not enough.
async fn recovery_after(throttles: usize, share: f64) -> Option<(Duration, usize)> {
    use kling_core::AccountId;
    use kling_ratelimit::BucketKey;

    use crate::support::{Reply, Server, request};

    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(4.0))
        .adaptive(Adaptive::new().start(Quota::per_second(4.0)))
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let key = BucketKey::account(Some(AccountId::new("a")));
    let rate = || {
        handle
            .backend()
            .key_state(&key)
            .unwrap()
            .adaptive_rate
            .unwrap()
    };
    server.script(std::iter::repeat_n(Reply::throttled(), throttles));
    for _ in 0..throttles {
        service
            .clone()
            .oneshot(request(Some("a"), "x"))
            .await
            .unwrap();
    }
    let lowest = rate();
    assert!(lowest < 4.0, "{throttles} 1302s left the rate at {lowest}");
    for successes in 1..=1000 {
        service
            .clone()
            .oneshot(request(Some("a"), "x"))
            .await
            .unwrap();
        if rate() >= 4.0 * share {
            let hits = server.hits();
            let recovered = hits.last().unwrap().at - hits[throttles].at;
            return Some((recovered, successes));
        }
    }
    None
}

/// After one 1302 the rate is back at the ceiling in under twelve seconds (46 successes):
/// down to 85%, most of the way back to 97% of the refused rate in ten successes, then
/// probing.
#[tokio::test(start_paused = true)]
async fn adaptive_recovery_after_one_1302_takes_seconds() {
    let (time, successes) = recovery_after(1, 1.0).await.expect("recovered");
    assert_eq!(successes, 46, "{time:?}");
    assert!(
        time > Duration::from_secs(11) && time < Duration::from_secs(12),
        "{time:?}"
    );
}

/// After thirty 1302s in a row — a server refusing every request for half an hour, whatever
/// the pace: 1 s and 2 s pauses, then 30 s and 60 s ones — the rate is back at 90% of the
/// ceiling within 292 successes (92 s of steady load) and at the ceiling within 430 (129 s):
/// the 1302s after the burst-backoff pauses left the rate alone, so the run lowered it three
/// times, to 61%. (Each lowering it took it to 0.8% of the ceiling, and 1,000 successes did
/// not bring it back to 90%.)
#[tokio::test(start_paused = true)]
async fn adaptive_recovery_after_a_long_run_of_1302s_is_bounded() {
    let (time, successes) = recovery_after(30, 0.9).await.expect("back to 90%");
    assert_eq!(successes, 292, "{time:?}");
    assert!(
        time > Duration::from_secs(92) && time < Duration::from_secs(93),
        "{time:?}"
    );
    let (time, successes) = recovery_after(30, 1.0).await.expect("back to the ceiling");
    assert_eq!(successes, 430, "{time:?}");
    assert!(
        time > Duration::from_secs(128) && time < Duration::from_secs(129),
        "{time:?}"
    );
}

/// A key with a `ceiling` per second, starting at 4/s, meets one 1302 answered with `reply`
/// (a `Retry-After`, or none), then a steady load of one request after another: the successes
/// (and the time from the first, the first request sent after the pause) until the rate is
/// back at `goal` requests per second, and the probe step of the success that got it there.
/// `None` when 2,000 successes were not enough.
async fn climb_after_one_1302(
    ceiling: f64,
    reply: crate::support::Reply,
    goal: f64,
) -> Option<(usize, Duration, f64)> {
    use kling_core::AccountId;
    use kling_ratelimit::BucketKey;

    use crate::support::{Server, request};

    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(ceiling))
        .adaptive(Adaptive::new().start(Quota::per_second(4.0)))
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let key = BucketKey::account(Some(AccountId::new("a")));
    let rate = || {
        handle
            .backend()
            .key_state(&key)
            .unwrap()
            .adaptive_rate
            .unwrap()
    };
    server.script([reply]);
    service
        .clone()
        .oneshot(request(Some("a"), "x"))
        .await
        .unwrap();
    assert_eq!(rate(), 4.0 * 0.85, "lowered from where it was refused");
    for successes in 1..=2000 {
        let before = rate();
        service
            .clone()
            .oneshot(request(Some("a"), "x"))
            .await
            .unwrap();
        if rate() >= goal {
            let hits = server.hits();
            let took = hits.last().unwrap().at - hits[1].at;
            return Some((successes, took, rate() - before));
        }
    }
    None
}

/// A `Retry-After` of about one interval (the header's least, one second, at 4/s) leaves the
/// rule as it was: the climb back to the limit is the one after a bare 1302, success for
/// success and to the nanosecond.
#[tokio::test(start_paused = true)]
async fn a_short_retry_after_climbs_back_as_a_bare_1302_does() {
    use crate::support::Reply;

    let bare = climb_after_one_1302(4.0, Reply::throttled(), 4.0).await;
    let short = climb_after_one_1302(4.0, Reply::throttled().header("retry-after", "1"), 4.0).await;
    assert_eq!(bare.map(|(n, _, _)| n), Some(46));
    assert_eq!(short, bare);
    // Two seconds is still the header's resolution past one interval.
    let two = climb_after_one_1302(4.0, Reply::throttled().header("retry-after", "2"), 4.0).await;
    assert_eq!(two.map(|(n, _, _)| n), Some(46));
}

/// A `Retry-After` of 3 s at 4/s costs four intervals past the header's resolution: the probe
/// goes four times slower, so the rate is back at the limit after 141 successes instead of
/// 46 (the climb to 97% of it, by a quarter of the way left per success, takes 21 instead of
/// 16: its last steps are the probe's), so the next 1302 comes about three times further apart.
#[tokio::test(start_paused = true)]
async fn a_long_retry_after_climbs_back_to_the_limit_more_slowly() {
    use crate::support::Reply;

    let (short, _, _) = climb_after_one_1302(4.0, Reply::throttled(), 4.0)
        .await
        .unwrap();
    let reply = || Reply::throttled().header("retry-after", "3");
    let (long, took, _) = climb_after_one_1302(4.0, reply(), 4.0).await.unwrap();
    assert_eq!((short, long), (46, 141), "{took:?}");
    let to_97 = |r| async move { climb_after_one_1302(4.0, r, 4.0 * 0.97).await.unwrap().0 };
    assert_eq!(
        (to_97(Reply::throttled()).await, to_97(reply()).await),
        (16, 21)
    );
}

/// A 60 s `Retry-After` slows the probe ten times (`max_caution`), not 232: the rate is back at
/// the limit within 324 successes (82 s of steady load), then probes by 0.1% of the limit per
/// success as before, so a limit raised 10% is found 100 successes later.
#[tokio::test(start_paused = true)]
async fn after_a_60_s_retry_after_recovery_is_bounded() {
    use crate::support::Reply;

    let reply = || Reply::throttled().header("retry-after", "60");
    let (successes, took, _) = climb_after_one_1302(8.0, reply(), 4.0).await.unwrap();
    assert_eq!(successes, 324, "{took:?}");
    assert!(
        took > Duration::from_secs(82) && took < Duration::from_secs(83),
        "{took:?}"
    );
    let (raised, _, step) = climb_after_one_1302(8.0, reply(), 4.4).await.unwrap();
    assert_eq!(raised, successes + 100);
    assert!((step - 0.004).abs() < 1e-12, "{step}");
}
