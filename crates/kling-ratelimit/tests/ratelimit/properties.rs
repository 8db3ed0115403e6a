//! Property: over random arrival patterns, admitted requests conform to the GCRA quota, go in
//! arrival order, and are never later than the quota and the queue ahead of them require.

use std::time::Duration;

use kling_ratelimit::{GcraLayer, Quota};
use proptest::prelude::*;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support::{Server, request};

/// Runs the arrivals (ms offsets, sorted) through a layer; returns admission times in ms.
fn admissions(period_ms: u64, burst: u32, arrivals: &[u64]) -> Vec<(usize, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let server = Server::new();
        let quota = Quota::with_period(Duration::from_millis(period_ms)).with_burst(burst);
        let service = GcraLayer::new(quota).unwrap().layer(server.service());
        let start = Instant::now();
        let mut calls = Vec::new();
        for (i, offset) in arrivals.iter().enumerate() {
            tokio::time::sleep_until(start + Duration::from_millis(*offset)).await;
            calls.push(tokio::spawn(
                service.clone().oneshot(request(Some("k"), &i.to_string())),
            ));
            // Let it reach the limiter before the next one arrives at the same instant.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        for call in calls {
            call.await.unwrap().unwrap();
        }
        server
            .times_ms(start)
            .into_iter()
            .map(|(tag, t)| (tag.parse().unwrap(), t as u64))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn admitted_requests_conform_to_the_quota(
        period_ms in 1u64..500,
        burst in 1u32..5,
        gaps in proptest::collection::vec(0u64..800, 1..40),
    ) {
        let arrivals: Vec<u64> = gaps.iter().scan(0, |t, g| { *t += g; Some(*t) }).collect();
        let admitted = admissions(period_ms, burst, &arrivals);
        prop_assert_eq!(admitted.len(), arrivals.len());
        let tau = period_ms * u64::from(burst - 1);
        let mut tat: Option<u64> = None;
        let mut previous = 0;
        for (n, (i, at)) in admitted.iter().copied().enumerate() {
            prop_assert_eq!(i, n, "served in arrival order");
            prop_assert!(at >= arrivals[i], "admitted before it arrived");
            // Never early: GCRA conformance over what was actually admitted.
            let earliest = tat.map_or(0, |t| t.saturating_sub(tau));
            prop_assert!(at >= earliest, "request {} at {} ms, quota allows {} ms", i, at, earliest);
            // Never late: as soon as it arrived, the quota allowed and the one before it went.
            let due = arrivals[i].max(earliest).max(previous);
            prop_assert!(at <= due + 1, "request {} at {} ms, due at {} ms", i, at, due);
            tat = Some(tat.map_or(at, |t| t.max(at)) + period_ms);
            previous = at;
        }
    }
}
