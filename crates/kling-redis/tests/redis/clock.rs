//! The fleet clock: the offset to the Redis server's `TIME` stays precise when probes are
//! answered late (a process descheduled on a loaded host).

use std::time::Duration;

use kling_core::AccountId;
use kling_ratelimit::{Backend, BucketKey, Cooldown, Policy, Quota};
use kling_redis::testing::{RedisServer, stall_clock_probes};
use kling_redis::{Connection, RedisConfig, RedisGcra};

use crate::support::redis;

/// How late a stalled probe's answer is read: the offset it gives is off by half of it.
const STALL: Duration = Duration::from_millis(40);
/// The server runs on this host's clock, so a precise offset is near zero; a stalled probe's
/// is 20 ms off.
const PRECISE_US: i64 = 3_000;

/// A lazy connection to `server`, not yet measured.
fn lazy(server: &RedisServer) -> Connection {
    Connection::lazy(
        RedisConfig::new(server.url())
            .prefix("clock")
            .command_timeout(Duration::from_secs(2)),
    )
    .unwrap()
}

/// Three slow probes in a row do not end the measurement: it goes on until one comes back
/// promptly.
#[tokio::test]
async fn a_measurement_whose_first_probes_are_read_late_keeps_probing() {
    let Some(server) = redis() else { return };
    let conn = lazy(&server);
    stall_clock_probes(&conn, 3, STALL);
    conn.calibrate().await.unwrap();
    let offset = conn.clock_offset_us();
    assert!(offset.abs() < PRECISE_US, "offset {offset} µs");
}

/// A later measurement whose every probe was read late does not replace a precise offset.
#[tokio::test]
async fn a_slow_measurement_does_not_replace_a_precise_one() {
    let Some(server) = redis() else { return };
    let conn = lazy(&server);
    conn.calibrate().await.unwrap();
    assert!(conn.clock_offset_us().abs() < PRECISE_US);
    stall_clock_probes(&conn, 10, STALL);
    conn.calibrate().await.unwrap();
    let offset = conn.clock_offset_us();
    assert!(offset.abs() < PRECISE_US, "offset {offset} µs");
}

/// An imprecise offset (every probe of the first measurement read late) is measured again a
/// second later, not after `calibrate_every` (30 s).
#[tokio::test]
async fn an_imprecise_offset_is_measured_again_within_seconds() {
    let Some(server) = redis() else { return };
    let conn = lazy(&server);
    stall_clock_probes(&conn, 10, STALL);
    conn.calibrate().await.unwrap();
    let offset = conn.clock_offset_us();
    assert!(offset.abs() >= PRECISE_US, "the stall shows: {offset} µs");

    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // A decision reads fleet time, which starts the measurement that is due.
    let gcra = RedisGcra::new(conn.clone());
    let key = BucketKey::account(Some(AccountId::new("clock")));
    let policy = Policy::new(Quota::per_second(100.0), Cooldown::default());
    gcra.acquire(&key, &policy).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while conn.clock_offset_us().abs() >= PRECISE_US {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {} µs",
            conn.clock_offset_us()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
