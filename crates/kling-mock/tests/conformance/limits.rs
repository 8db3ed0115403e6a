//! Account limits: weighted slots, credits and their period, request-rate GCRA with penalty, the
//! `/account/costs` limit, Retry-After, speed.

use std::time::Duration;

use kling_mock::{MAX_STATS_POOLS, MockConfig, Preset, RetryAfterMode, Switches};
use serde_json::json;

use crate::support::{Caller, advance, quiet, secs};

const T2V: &str = "/v1/videos/text2video";
const IMG: &str = "/v1/images/generations";
/// A request of no particular class (a legacy list), for the account-wide request rate.
const LIST: &str = "/v1/videos/text2video?pageSize=1";

#[tokio::test(start_paused = true)]
async fn an_image_request_with_n_4_takes_4_image_slots() {
    let c = Caller::new(quiet()); // Pro: 5 slots
    c.post(IMG, json!({"prompt": "x", "n": 4})).await.data();
    assert_eq!(c.mock.in_use("test-key", "image"), 4);
    c.post(IMG, json!({"prompt": "x", "n": 2}))
        .await
        .assert_error(429, 1303);
    c.post(IMG, json!({"prompt": "x"})).await.data();
    c.post(IMG, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
    let stats = c.mock.stats();
    assert_eq!(stats.max_concurrent["image"], 5);
    assert_eq!(stats.in_use["image"], 5);
    advance(100).await;
    assert_eq!(c.mock.in_use("test-key", "image"), 0);
    let stats = c.mock.stats();
    assert_eq!(stats.tasks_finished, 2);
    assert_eq!(stats.task_seconds["image"], 200.0);
}

#[tokio::test(start_paused = true)]
async fn a_new_style_image_request_weighs_n_too() {
    let c = Caller::new(quiet().pool_slots("image:kolors-v2", 9));
    c.post("/text-to-image/kolors-v2", json!({"prompt": "x", "n": 9}))
        .await
        .data();
    c.post("/text-to-image/kolors-v2", json!({"prompt": "x", "n": 1}))
        .await
        .assert_error(429, 1303);
}

/// A task holds its slot until it ends, whether it succeeds or fails.
#[tokio::test(start_paused = true)]
async fn a_slot_is_held_until_the_task_ends_and_failures_count() {
    for failure_rate in [0.0, 1.0] {
        let c = Caller::new(
            MockConfig::preset(Preset::Free)
                .no_rate_limit()
                .failure_rate(failure_rate)
                .task_duration(secs(100), secs(100)),
        );
        let task = c.post(T2V, json!({"prompt": "x"})).await.data().clone();
        advance(99).await;
        c.post(T2V, json!({"prompt": "x"}))
            .await
            .assert_error(429, 1303);
        advance(1).await;
        c.post(T2V, json!({"prompt": "x"})).await.data();
        let id = task["task_id"].as_str().expect("a task id");
        let ended = c.get(&format!("{T2V}/{id}")).await.data().clone();
        let status = if failure_rate > 0.0 {
            "failed"
        } else {
            "succeed"
        };
        assert_eq!(ended["task_status"], status, "{ended}");
    }
}

#[tokio::test(start_paused = true)]
async fn slots_held_by_another_tenant_count_against_the_account() {
    let c = Caller::new(quiet().slots(2));
    c.mock.occupy("test-key", "video", 2, secs(30));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
    advance(30).await;
    c.post(T2V, json!({"prompt": "x"})).await.data();
}

#[tokio::test(start_paused = true)]
async fn after_the_first_1102_every_create_gets_1102_forever_but_queries_work() {
    let c = Caller::new(quiet().credits(2.0));
    let id = c.post(T2V, json!({"prompt": "x"})).await.data()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.post(IMG, json!({"prompt": "x", "n": 2}))
        .await
        .assert_error(429, 1102);
    // 1 credit is still left, but the pack is reported exhausted from now on.
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
    advance(1000).await;
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
    c.post("/text-to-video/kling-3.0", json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
    assert_eq!(
        c.get(&format!("{T2V}/{id}")).await.data()["task_status"],
        "succeed"
    );
    let stats = c.mock.stats();
    assert_eq!(stats.responses_by_code["1102"], 4);
    assert_eq!(
        stats.creates_after_1102, 2,
        "the one 0 ms after does not count, the two later do"
    );
}

#[tokio::test(start_paused = true)]
async fn gcra_spaces_requests_and_counts_every_request() {
    let c = Caller::new(quiet().rate_per_minute(30.0)); // one per 2 s, burst 1
    c.post(T2V, json!({"prompt": "x"})).await.data();
    advance(1).await;
    c.get("/tasks?task_ids=1").await.assert_error(429, 1302);
    advance(1).await;
    c.get(&format!("{T2V}?pageSize=1")).await.data();
}

#[tokio::test(start_paused = true)]
async fn a_burst_allows_back_to_back_requests() {
    let c = Caller::new(quiet().rate_per_minute(60.0).burst(3));
    for _ in 0..3 {
        c.get(LIST).await.data();
    }
    c.get(LIST).await.assert_error(429, 1302);
}

#[tokio::test(start_paused = true)]
async fn penalty_mode_pushes_the_next_allowed_time_on_every_refusal() {
    let plain = Caller::new(quiet().rate_per_minute(60.0));
    let penal = Caller::new(quiet().rate_per_minute(60.0).penalty(true));
    plain.get(LIST).await.data();
    penal.get(LIST).await.data();
    for _ in 0..3 {
        advance_ms(300).await;
        plain.get(LIST).await.assert_error(429, 1302);
        penal.get(LIST).await.assert_error(429, 1302);
    }
    // 1 s after the first request: the plain limiter lets the next one through...
    advance_ms(100).await;
    plain.get(LIST).await.data();
    // ...the penalised one pushed its next slot 1 s further per refusal: 1 + 4 = 5 s.
    let r = penal.get(LIST).await;
    r.assert_error(429, 1302);
    advance_ms(3_950).await;
    // Still early at 4.95 s, which pushes it once more, to 6 s.
    penal.get(LIST).await.assert_error(429, 1302);
    advance_ms(1_000).await;
    penal.get(LIST).await.assert_error(429, 1302);
    // 5.95 s was early again (→ 7 s); obeying the advertised time finally works.
    advance_ms(1_050).await;
    penal.get(LIST).await.data();
}

/// A client that keeps sending through a penalty lockout pushes the next allowed time, but never
/// past ten years from now: the `Retry-After` date stays one a client can read (it panicked
/// once the lockout passed the year 9999).
#[tokio::test(start_paused = true)]
async fn a_penalty_lockout_is_bounded_and_its_retry_after_date_stays_valid() {
    // One request a century (the interval is capped at ten years), penalty on.
    let c = Caller::new(
        quiet()
            .rate_per_minute(1e-9)
            .penalty(true)
            .retry_after(RetryAfterMode::Date),
    );
    c.get(LIST).await.data();
    let ten_years = Duration::from_secs(10 * 365 * 24 * 3600);
    for i in 0..1_000 {
        let r = c.get(LIST).await;
        r.assert_error(429, 1302);
        let retry = httpdate::parse_http_date(r.headers["retry-after"].to_str().unwrap()).unwrap();
        let date = httpdate::parse_http_date(r.headers["date"].to_str().unwrap()).unwrap();
        let wait = retry.duration_since(date).unwrap();
        // Still locked out, never beyond the bound (plus the date's rounding up).
        assert!(
            wait >= ten_years && wait <= ten_years + Duration::from_secs(1),
            "refusal {i}: {wait:?}"
        );
    }
}

async fn advance_ms(ms: u64) {
    tokio::time::advance(Duration::from_millis(ms)).await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_is_the_ceiled_wait_on_1302_and_1303() {
    let c = Caller::new(
        quiet()
            .rate_per_minute(60.0)
            .slots(1)
            .retry_after(RetryAfterMode::Seconds),
    );
    c.post(T2V, json!({"prompt": "x"})).await.data();
    advance_ms(100).await;
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(r.headers["retry-after"], "1", "0.9 s rounds up to 1");
    advance_ms(1_000).await;
    let r = c.post(T2V, json!({"prompt": "x"})).await;
    r.assert_error(429, 1303);
    // The task ends 100 s after creation, now is 1.1 s after: 98.9 s → 99.
    assert_eq!(r.headers["retry-after"], "99");
}

#[tokio::test(start_paused = true)]
async fn retry_after_date_is_rounded_up_and_comes_with_a_date_header() {
    let c = Caller::new(
        quiet()
            .rate_per_minute(60.0)
            .retry_after(RetryAfterMode::Date),
    );
    c.get(LIST).await.data();
    advance_ms(250).await;
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    let retry = httpdate::parse_http_date(r.headers["retry-after"].to_str().unwrap()).unwrap();
    let date = httpdate::parse_http_date(r.headers["date"].to_str().unwrap()).unwrap();
    let gap = retry.duration_since(date).unwrap();
    assert!(
        gap >= Duration::from_secs(1) && gap <= Duration::from_secs(2),
        "gap {gap:?}"
    );
}

/// With a lockout, a 1302 refuses every request of the account (creates too) until the lockout
/// ends, however slow, each refusal's `Retry-After` naming the time left rounded up; without
/// one (the default) the request one interval later passes as before.
#[tokio::test(start_paused = true)]
async fn a_rate_lockout_refuses_until_it_ends_naming_the_time_left_in_seconds() {
    let config = quiet()
        .rate_per_minute(60.0)
        .retry_after(RetryAfterMode::Seconds);
    assert_eq!(config.rate_lockout, None, "off by default");
    let plain = Caller::new(config.clone());
    let locked = Caller::new(config.rate_lockout(secs(5)));
    for c in [&plain, &locked] {
        c.get(LIST).await.data();
    }
    advance_ms(250).await;
    let r = plain.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(
        r.headers["retry-after"], "1",
        "one interval without a lockout"
    );
    let r = locked.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(
        r.headers["retry-after"], "5",
        "the lockout, from this refusal"
    );
    advance_ms(1_000).await; // 1.25 s: past the interval, 4 s of the lockout left
    plain.get(LIST).await.data();
    let r = locked.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(r.headers["retry-after"], "4");
    let r = locked.post(T2V, json!({"prompt": "x"})).await;
    r.assert_error(429, 1302);
    assert_eq!(r.headers["retry-after"], "4");
    advance_ms(3_700).await; // 4.95 s: 0.3 s left, rounded up
    let r = locked.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(r.headers["retry-after"], "1");
    // Refusals within it did not lengthen it.
    advance_ms(300).await;
    locked.get(LIST).await.data();
    assert_eq!(locked.mock.stats().responses_by_code["1302"], 4);
}

/// A caller at 60 requests a minute whose 1302s lock it out for 5 s (`Retry-After` in `mode`),
/// its first request sent 250 ms ago: its next is refused and starts the lockout.
async fn a_request_from_a_5_s_lockout(mode: RetryAfterMode) -> Caller {
    let c = Caller::new(
        quiet()
            .rate_per_minute(60.0)
            .rate_lockout(secs(5))
            .retry_after(mode),
    );
    c.get(LIST).await.data();
    advance_ms(250).await;
    c
}

/// The throttled switch turned on within a lockout names the time left of the lockout, not one
/// interval: a client that came back after one interval met the lockout's refusal next. Past
/// the lockout it names one interval again.
#[tokio::test(start_paused = true)]
async fn the_throttled_switch_within_a_lockout_names_the_time_left() {
    let c = a_request_from_a_5_s_lockout(RetryAfterMode::Seconds).await;
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(r.headers["retry-after"], "5", "the lockout starts");
    c.mock.set_switches(Switches::new().throttled(true));
    advance_ms(1_000).await;
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(r.headers["retry-after"], "4", "the lockout's time left");
    advance_ms(4_000).await;
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(
        r.headers["retry-after"], "1",
        "one interval past the lockout"
    );
}

/// The date form names the lockout's end, the same instant on every refusal within it, at
/// least the time left after the answer's `Date`.
#[tokio::test(start_paused = true)]
async fn a_rate_lockout_names_its_end_in_the_date_form() {
    let c = a_request_from_a_5_s_lockout(RetryAfterMode::Date).await;
    let mut ends = Vec::new();
    // Time left at each refusal: 5 s, 3.75 s, 0.5 s.
    for (step, left) in [(0, 5_000), (1_250, 3_750), (3_250, 500)] {
        advance_ms(step).await;
        let r = c.get(LIST).await;
        r.assert_error(429, 1302);
        let retry = httpdate::parse_http_date(r.headers["retry-after"].to_str().unwrap()).unwrap();
        let date = httpdate::parse_http_date(r.headers["date"].to_str().unwrap()).unwrap();
        let gap = retry.duration_since(date).unwrap();
        // `Date` is cut to the second and the end rounded up: up to 2 s over.
        let left = Duration::from_millis(left);
        assert!(
            gap >= left && gap <= left + Duration::from_secs(2),
            "{left:?} left, gap {gap:?}"
        );
        ends.push(retry);
    }
    assert!(ends.windows(2).all(|w| w[0] == w[1]), "{ends:?}");
    advance_ms(500).await;
    c.get(LIST).await.data();
}

/// The throttled switch within a lockout names the lockout's end in the date form too, the
/// instant the lockout's own refusals name; past the lockout, one interval after `Date`.
#[tokio::test(start_paused = true)]
async fn the_throttled_switch_within_a_lockout_names_its_end_in_the_date_form() {
    let c = a_request_from_a_5_s_lockout(RetryAfterMode::Date).await;
    let retry_after = |r: &crate::support::Reply| {
        httpdate::parse_http_date(r.headers["retry-after"].to_str().unwrap()).unwrap()
    };
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    let end = retry_after(&r);
    c.mock.set_switches(Switches::new().throttled(true));
    for step in [1_000, 2_500] {
        advance_ms(step).await;
        let r = c.get(LIST).await;
        r.assert_error(429, 1302);
        assert_eq!(retry_after(&r), end, "the lockout's end");
    }
    advance_ms(1_500).await;
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    let date = httpdate::parse_http_date(r.headers["date"].to_str().unwrap()).unwrap();
    let gap = retry_after(&r).duration_since(date).unwrap();
    assert!(
        gap >= secs(1) && gap <= secs(2),
        "one interval past the lockout: {gap:?}"
    );
}

/// A `/account/costs` 1302 locks the account too, and the lockout is divided by the speed.
#[tokio::test(start_paused = true)]
async fn a_costs_refusal_starts_the_lockout_which_the_speed_divides() {
    let c = Caller::new(
        quiet()
            .speed(10.0)
            .rate_lockout(secs(5))
            .retry_after(RetryAfterMode::Seconds),
    );
    c.get("/account/costs").await.data();
    c.get("/account/costs").await.assert_error(429, 1302);
    advance_ms(490).await; // 4.9 s of API time
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(r.headers["retry-after"], "1", "never below a real second");
    advance_ms(10).await;
    c.get(LIST).await.data();
}

/// A lockout shorter than the rate limit's own wait: a refusal within it names the longer of
/// the two, or a client obeying it came back while the rate limit still refused (and locked
/// it again).
#[tokio::test(start_paused = true)]
async fn a_refusal_within_a_short_lockout_names_the_rate_limits_longer_wait() {
    let c = Caller::new(
        quiet()
            .rate_per_minute(6.0) // one request each 10 s
            .rate_lockout(secs(5))
            .retry_after(RetryAfterMode::Seconds),
    );
    c.get(LIST).await.data();
    advance_ms(250).await;
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(r.headers["retry-after"], "10");
    advance_ms(750).await; // 1 s: 4.25 s of the lockout left, 9 s of the interval
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(r.headers["retry-after"], "9");
    advance(9).await;
    c.get(LIST).await.data();
}

/// In penalty mode the refusal that starts a short lockout pushes the rate limit's next allowed
/// time past the lockout's end: the throttled switch names that time (both forms), the instant
/// the lockout's own refusals name, not one interval or the lockout's time left; a client
/// that waited one interval was refused again (and pushed once more).
#[tokio::test(start_paused = true)]
async fn the_throttled_switch_names_the_penalty_pushed_wait_past_a_short_lockout() {
    for mode in [RetryAfterMode::Seconds, RetryAfterMode::Date] {
        let c = Caller::new(
            quiet()
                .rate_per_minute(6.0) // one request each 10 s
                .penalty(true)
                .rate_lockout(secs(5))
                .retry_after(mode),
        );
        c.get(LIST).await.data();
        advance_ms(250).await;
        // Pushed to 20 s; locked until 5.25 s.
        c.get(LIST).await.assert_error(429, 1302);
        advance_ms(750).await; // 1 s: 4.25 s of the lockout left, 19 s of the rate limit
        c.mock.set_switches(Switches::new().throttled(true));
        let throttled = c.get(LIST).await;
        throttled.assert_error(429, 1302);
        c.mock.set_switches(Switches::new());
        let locked = c.get(LIST).await;
        locked.assert_error(429, 1302);
        assert_eq!(
            throttled.headers["retry-after"], locked.headers["retry-after"],
            "{mode:?}: the throttled switch names the lockout's own refusal's time"
        );
        if mode == RetryAfterMode::Seconds {
            assert_eq!(throttled.headers["retry-after"], "19");
        }
        advance(19).await;
        c.get(LIST).await.data();
    }
}

/// Without a lockout too: refusals in penalty mode pushed the next allowed time 3 s past one
/// interval, which the throttled switch names rather than the interval.
#[tokio::test(start_paused = true)]
async fn the_throttled_switch_names_the_penalty_pushed_wait_without_a_lockout() {
    let c = Caller::new(
        quiet()
            .rate_per_minute(60.0)
            .penalty(true)
            .retry_after(RetryAfterMode::Seconds),
    );
    c.get(LIST).await.data();
    for _ in 0..3 {
        advance_ms(300).await;
        c.get(LIST).await.assert_error(429, 1302);
    }
    advance_ms(100).await; // 1 s: the next allowed time is 4 s
    c.mock.set_switches(Switches::new().throttled(true));
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    assert_eq!(r.headers["retry-after"], "3");
    c.mock.set_switches(Switches::new());
    advance(3).await;
    c.get(LIST).await.data();
}

/// For an `/account/costs` query the throttled switch names the wait of that endpoint's own
/// limit too, when longer than a second; another request, which that limit does not hold,
/// still gets one second.
#[tokio::test(start_paused = true)]
async fn the_throttled_switch_names_the_costs_limits_wait_for_a_costs_query() {
    let c = Caller::new(
        quiet()
            .costs_per_second(0.2) // one query each 5 s
            .retry_after(RetryAfterMode::Seconds),
    );
    c.get("/account/costs").await.data();
    c.mock.set_switches(Switches::new().throttled(true));
    let costs = c.get("/account/costs").await;
    costs.assert_error(429, 1302);
    assert_eq!(costs.headers["retry-after"], "5");
    let list = c.get(LIST).await;
    list.assert_error(429, 1302);
    assert_eq!(list.headers["retry-after"], "1");
    c.mock.set_switches(Switches::new());
    advance(5).await;
    c.get("/account/costs").await.data();
}

/// Past 2^53 ns (about 104 days) an `f64` cannot hold a wait to the nanosecond: the seconds
/// form is rounded up in integers, or a lockout 1 ns over a whole second was named a second
/// short and a client obeying it was refused again.
#[tokio::test(start_paused = true)]
async fn a_long_rate_lockout_is_never_named_a_second_short() {
    let c = Caller::new(
        quiet()
            .rate_per_minute(60.0)
            .rate_lockout(secs(20_000_000))
            .retry_after(RetryAfterMode::Seconds),
    );
    c.get(LIST).await.data();
    c.get(LIST).await.assert_error(429, 1302);
    // 19,999,999 s and 1 ns left.
    tokio::time::advance(secs(1) - Duration::from_nanos(1)).await;
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    let named: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    tokio::time::advance(secs(named)).await;
    c.get(LIST).await.data();
}

/// A zero lockout would be none: refused, naming the field.
#[test]
fn a_zero_rate_lockout_is_refused_naming_the_field() {
    let err = kling_mock::MockKling::new(quiet().rate_lockout(Duration::ZERO)).unwrap_err();
    assert_eq!(err.field(), "rate_lockout");
}

#[tokio::test(start_paused = true)]
async fn without_a_mode_there_is_no_retry_after() {
    let c = Caller::new(quiet().rate_per_minute(60.0));
    c.get(LIST).await.data();
    let r = c.get(LIST).await;
    r.assert_error(429, 1302);
    assert!(r.headers.get("retry-after").is_none());
}

#[tokio::test(start_paused = true)]
async fn the_speed_factor_divides_task_durations_and_rate_windows() {
    let c = Caller::new(quiet().speed(10.0).rate_per_minute(60.0));
    let id = c.post(T2V, json!({"prompt": "x"})).await.data()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    advance_ms(100).await; // one API second
    let q = c.get(&format!("{T2V}/{id}")).await;
    assert_eq!(q.data()["task_status"], "submitted");
    advance_ms(50).await;
    c.get(&format!("{T2V}/{id}")).await.assert_error(429, 1302);
    advance_ms(9_850).await; // 10 s real = 100 s API
    let q = c.get(&format!("{T2V}/{id}")).await;
    assert_eq!(q.data()["task_status"], "succeed");
    assert_eq!(c.mock.stats().task_seconds["video"], 10.0);
}

/// Kling never answers a create with a finished task: a life of zero API seconds, or one a huge
/// speed scales to nothing, still starts `submitted` and ends a tick later.
#[tokio::test(start_paused = true)]
async fn a_task_scaled_to_nothing_is_still_submitted_when_created() {
    for config in [quiet().task_duration(secs(0), secs(0)), quiet().speed(1e15)] {
        let c = Caller::new(config);
        let created = c.post(T2V, json!({"prompt": "x"})).await;
        assert_eq!(created.data()["task_status"], "submitted");
        let id = created.data()["task_id"].as_str().unwrap().to_owned();
        let created = c
            .post("/text-to-video/kling-3.0", json!({"prompt": "x"}))
            .await;
        assert_eq!(created.data()["status"], "submitted");
        assert_eq!(c.mock.in_use("test-key", "video"), 1);
        advance_ms(1).await;
        let q = c.get(&format!("{T2V}/{id}")).await;
        assert_eq!(q.data()["task_status"], "succeed");
        assert_eq!(c.mock.in_use("test-key", "video"), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn task_durations_are_drawn_from_the_configured_range() {
    let c = Caller::new(
        quiet()
            .slots(100)
            .task_duration(secs(60), secs(120))
            .seed(3),
    );
    for _ in 0..50 {
        c.post(T2V, json!({"prompt": "x"})).await.data();
    }
    let total = c.mock.stats().task_seconds["video"];
    assert!((50.0 * 60.0..=50.0 * 120.0).contains(&total));
    advance(59).await;
    assert_eq!(c.mock.in_use("test-key", "video"), 50);
    advance(62).await;
    assert_eq!(c.mock.in_use("test-key", "video"), 0);
}

#[tokio::test(start_paused = true)]
async fn ghost_creates_answer_5000_but_bill_a_task_findable_by_external_id() {
    let c = Caller::new(quiet().ghost_create_rate(1.0));
    let r = c
        .post(T2V, json!({"prompt": "x", "external_task_id": "g1"}))
        .await;
    r.assert_error(500, 5000);
    assert_eq!(c.mock.stats().tasks_created, 1);
    let q = c.get(&format!("{T2V}/g1")).await;
    assert_eq!(q.data()["task_status"], "submitted");
}

/// Ghost creates answer the two codes Kling says a create may follow, in turn: 5000, then 5002
/// (HTTP 504), each with its task made and findable.
#[tokio::test(start_paused = true)]
async fn ghost_creates_answer_5000_and_5002_in_turn() {
    let c = Caller::new(quiet().ghost_create_rate(1.0));
    c.post(T2V, json!({"prompt": "x", "external_task_id": "g1"}))
        .await
        .assert_error(500, 5000);
    c.post(T2V, json!({"prompt": "x", "external_task_id": "g2"}))
        .await
        .assert_error(504, 5002);
    assert_eq!(c.mock.stats().tasks_created, 2);
    c.get(&format!("{T2V}/g2")).await.data();
}

#[tokio::test(start_paused = true)]
async fn malformed_answers_are_200_and_not_json() {
    use http_body_util::{BodyExt, Full};
    use tower_service::Service;
    let mut mock = crate::support::mock(quiet().malformed_rate(1.0));
    let req = http::Request::get("/account/costs")
        .header("authorization", "Bearer k")
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = mock.call(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(serde_json::from_slice::<serde_json::Value>(&body).is_err());
}

/// A malformed answer is the answer the request really got with its body garbled: HTTP 200
/// to a create means the create was carried out (a client may not send it again), so its task
/// exists. The fault answered 200 and made nothing.
#[tokio::test(start_paused = true)]
async fn a_malformed_answer_to_a_create_garbles_the_answer_of_a_task_made() {
    use http_body_util::{BodyExt, Full};
    use tower_service::Service;
    let mut mock = crate::support::mock(quiet().malformed_rate(1.0));
    let req = http::Request::post(T2V)
        .header("authorization", "Bearer k")
        .body(Full::new(bytes::Bytes::from_static(
            br#"{"prompt":"x","external_task_id":"m-1"}"#,
        )))
        .unwrap();
    let resp = mock.call(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(serde_json::from_slice::<serde_json::Value>(&body).is_err());
    let stats = mock.stats();
    assert_eq!(stats.malformed_responses, 1);
    assert_eq!(
        stats.tasks_created, 1,
        "a 200 create made its task: {stats:?}"
    );
    assert_eq!(mock.in_use("k", "video"), 1);
    assert!(
        stats.responses_by_code.is_empty(),
        "no code was readable: {stats:?}"
    );
}

/// A malformed refusal keeps its status (and headers) and garbles its body: a client still
/// reads a 429 or a 401 from the status, and nothing was made.
#[tokio::test(start_paused = true)]
async fn a_malformed_refusal_keeps_its_status_and_makes_nothing() {
    use http_body_util::{BodyExt, Full};
    use tower_service::Service;
    let mut mock = crate::support::mock(
        MockConfig::preset(Preset::Free)
            .no_rate_limit()
            .retry_after(RetryAfterMode::Seconds)
            .malformed_rate(1.0),
    );
    mock.occupy("k", "video", 1, secs(100));
    let create = |auth: &str| {
        http::Request::post(T2V)
            .header("authorization", auth)
            .body(Full::new(bytes::Bytes::from_static(br#"{"prompt":"x"}"#)))
            .unwrap()
    };
    for (auth, status) in [("Bearer k", 429), ("Basic k", 401)] {
        let resp = mock.call(create(auth)).await.unwrap();
        assert_eq!(resp.status(), status, "{auth}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(!body.is_empty(), "{auth}");
        assert!(
            serde_json::from_slice::<serde_json::Value>(&body).is_err(),
            "{auth}: {body:?}"
        );
    }
    let stats = mock.stats();
    assert_eq!((stats.malformed_responses, stats.tasks_created), (2, 0));
}

/// One seed, one run: with every fault on, two mocks of the same seed fed the same requests
/// answer each alike (dropped, lost, garbled, late or not, and with what), and make the same
/// tasks. The faults that now carry the request out draw from the same generator as the task
/// they make; this keeps them deterministic.
#[tokio::test(start_paused = true)]
async fn the_same_seed_draws_the_same_faults() {
    use http_body_util::{BodyExt, Full};
    use tower_service::Service;
    async fn run(seed: u64) -> (Vec<String>, kling_mock::Stats) {
        let mut mock = crate::support::mock(
            quiet()
                .slots(1000)
                .drop_rate(0.1)
                .malformed_rate(0.1)
                .fault_rate(0.1)
                .slow(0.1, secs(3))
                .lost_answer_rate(0.1)
                .ghost_create_rate(0.1)
                .failure_rate(0.3)
                .task_duration(secs(10), secs(100))
                .seed(seed),
        );
        let mut seen = Vec::new();
        for i in 0..300 {
            let req = http::Request::post(T2V)
                .header("authorization", "Bearer k")
                .body(Full::new(bytes::Bytes::from(format!(
                    r#"{{"prompt":"x","external_task_id":"e{}"}}"#,
                    i % 250
                ))))
                .unwrap();
            let started = tokio::time::Instant::now();
            seen.push(match mock.call(req).await {
                Err(e) => format!("{e}"),
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    let body = String::from_utf8_lossy(&body).replace(char::is_numeric, "");
                    format!("{status} {:?} {body}", started.elapsed())
                }
            });
        }
        advance(200).await;
        (seen, mock.stats())
    }
    let (first, first_stats) = run(3).await;
    let (again, again_stats) = run(3).await;
    assert_eq!(first, again);
    assert_eq!(first_stats.tasks_created, again_stats.tasks_created);
    assert_eq!(first_stats.tasks_finished, again_stats.tasks_finished);
    assert_eq!(first_stats.responses_by_code, again_stats.responses_by_code);
    // Every fault met some request (the run is no proof otherwise).
    for (what, n) in [
        ("dropped", first_stats.connections_dropped),
        ("lost", first_stats.answers_lost),
        ("malformed", first_stats.malformed_responses),
        ("5000", first_stats.responses("5000")),
        ("5001", first_stats.responses("5001")),
        ("1201", first_stats.responses("1201")),
    ] {
        assert!(n > 0, "no {what}: {first_stats:?}");
    }
    assert!(first.iter().any(|s| s.contains("3s")), "no slow answer");
    assert_ne!(run(4).await.0, first, "another seed draws otherwise");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_connection_is_a_mock_error_in_process() {
    use http_body_util::Full;
    use tower_service::Service;
    let mut mock = crate::support::mock(quiet().drop_rate(1.0));
    let req = http::Request::get("/account/costs")
        .header("authorization", "Bearer k")
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let err = mock.call(req).await.unwrap_err();
    assert_eq!(err.to_string(), "connection dropped by mock");
    assert_eq!(mock.stats().connections_dropped, 1);
}

/// A lost answer is a dropped connection like the `drop_rate` fault's, but the request was
/// carried out: the create made its task, billed. The `drop_rate` fault makes nothing.
#[tokio::test(start_paused = true)]
async fn a_lost_answer_drops_the_connection_after_the_create_made_its_task() {
    use http_body_util::Full;
    use tower_service::Service;
    let create = || {
        http::Request::post(T2V)
            .header("authorization", "Bearer k")
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from_static(
                br#"{"prompt":"x","external_task_id":"job-1"}"#,
            )))
            .unwrap()
    };

    let mut lost = crate::support::mock(quiet().lost_answer_rate(1.0));
    let err = lost.call(create()).await.unwrap_err();
    assert_eq!(err.to_string(), "connection dropped by mock");
    let stats = lost.stats();
    assert_eq!((stats.answers_lost, stats.connections_dropped), (1, 0));
    assert_eq!(stats.tasks_created, 1, "the task was made");
    assert_eq!(stats.responses("0"), 0, "its answer was never sent");

    let mut dropped = crate::support::mock(quiet().drop_rate(1.0));
    assert!(dropped.call(create()).await.is_err());
    assert_eq!(
        dropped.stats().tasks_created,
        0,
        "dropped before it was carried out"
    );
}

/// A refusal is an answer too: a request that draws the lost-answer fault loses its answer
/// whether the mock carried it out or refused it early (no or a bad key, a switch, the rate,
/// an unknown path), so the configured rate is the share of requests whose answer is lost.
#[tokio::test(start_paused = true)]
async fn a_lost_answer_meets_refusals_too_at_the_configured_rate() {
    use http_body_util::Full;
    use kling_mock::Switches;
    use tower_service::Service;
    let request = |path: &str, auth: Option<&str>| {
        let mut builder = http::Request::get(path);
        if let Some(auth) = auth {
            builder = builder.header("authorization", auth);
        }
        builder.body(Full::new(bytes::Bytes::new())).unwrap()
    };

    let mut every = crate::support::mock(quiet().lost_answer_rate(1.0));
    every.set_account_switches("throttled", Switches::new().throttled(true));
    for (path, auth) in [
        (LIST, None),
        (LIST, Some("Basic x")),
        (LIST, Some("Bearer throttled")),
        ("/v1/nowhere", Some("Bearer k")),
        (LIST, Some("Bearer k")),
    ] {
        let err = every.call(request(path, auth)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "connection dropped by mock",
            "{path} {auth:?}"
        );
    }
    let stats = every.stats();
    assert_eq!(stats.answers_lost, 5, "{stats:?}");
    assert!(
        stats.responses_by_code.is_empty(),
        "none was answered: {stats:?}"
    );

    // Half the requests refused early (no key), half answered: each half loses its share.
    const EACH: u32 = 2000;
    let mut some = crate::support::mock(quiet().lost_answer_rate(0.3).seed(5));
    let (mut refused_lost, mut answered_lost) = (0, 0);
    for _ in 0..EACH {
        refused_lost += u32::from(some.call(request(LIST, None)).await.is_err());
        answered_lost += u32::from(some.call(request(LIST, Some("Bearer k"))).await.is_err());
    }
    for (what, lost) in [("refused", refused_lost), ("answered", answered_lost)] {
        let share = f64::from(lost) / f64::from(EACH);
        assert!((0.26..0.34).contains(&share), "{what}: {share}");
    }
    assert_eq!(
        some.stats().answers_lost,
        u64::from(refused_lost + answered_lost)
    );
}

/// A lost answer is never counted among the responses sent, not even for a moment: a reader of
/// the stats on another thread (a bench's sampler, `GET /__mock/stats`) saw its code counted,
/// as the mock counted each response when it built it and took a lost one back after.
/// Real time and a second thread: the race it shows needs one.
#[tokio::test]
async fn a_lost_answer_is_never_seen_counted_as_sent() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use http_body_util::Full;
    use tower_service::Service;
    let mut mock = crate::support::mock(quiet().lost_answer_rate(1.0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (mock, stop) = (mock.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = 0;
            while !stop.load(Ordering::Relaxed) {
                let stats = mock.stats();
                let sent: u64 = stats.responses_by_code.values().sum();
                seen += sent;
                assert!(stats.answers_lost <= stats.requests_total, "{stats:?}");
            }
            seen
        })
    };
    for _ in 0..5000 {
        let req = http::Request::get(LIST)
            .header("authorization", "Bearer k")
            .body(Full::new(bytes::Bytes::new()))
            .unwrap();
        assert!(mock.call(req).await.is_err());
    }
    stop.store(true, Ordering::Relaxed);
    let seen = reader.join().unwrap();
    assert_eq!(seen, 0, "responses counted that were never sent");
    let stats = mock.stats();
    assert_eq!((stats.requests_total, stats.answers_lost), (5000, 5000));
    assert!(stats.responses_by_code.is_empty(), "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn slow_answers_arrive_after_the_scaled_delay() {
    let c = Caller::new(quiet().speed(2.0).slow(1.0, secs(10)));
    let started = tokio::time::Instant::now();
    c.get("/account/costs").await.data();
    assert_eq!(started.elapsed(), secs(5));
}

/// A slow answer is late, not the request: the create is carried out when it arrives (its task
/// made, its slot held), so a client that gives up waiting and goes away leaves a billed task,
/// as with a real server (DESIGN fact 6). It made none: the mock slept before handling, and the
/// dropped future took the request with it. A create sent again with the same external id is
/// refused as a duplicate.
#[tokio::test(start_paused = true)]
async fn a_slow_answer_is_late_but_its_create_is_made_on_arrival() {
    let c = Caller::new(quiet().slow(1.0, secs(30)));
    let create = || c.post(T2V, json!({"prompt": "x", "external_task_id": "slow-1"}));
    let gave_up = tokio::time::timeout(secs(5), create()).await;
    assert!(gave_up.is_err(), "answered within 5 s: {gave_up:?}");
    let stats = c.mock.stats();
    assert_eq!(stats.tasks_created, 1, "made on arrival: {stats:?}");
    assert_eq!(c.mock.in_use("test-key", "video"), 1);
    assert!(
        stats.responses_by_code.is_empty(),
        "its answer was never sent: {stats:?}"
    );
    advance(60).await;
    assert_eq!(c.mock.stats().tasks_created, 1, "and made once");

    // The client sends it again, with the same external id: a duplicate, answered late too.
    let started = tokio::time::Instant::now();
    create().await.assert_error(400, 1201);
    assert_eq!(started.elapsed(), secs(30));
    assert_eq!(c.mock.stats().tasks_created, 1);
}

/// A slow answer is built on arrival but counted by its code when it is sent, after the delay:
/// a snapshot taken in between shows the task and no answer.
#[tokio::test(start_paused = true)]
async fn a_slow_answer_is_counted_when_it_is_sent() {
    let c = Caller::new(quiet().slow(1.0, secs(30)));
    let answer = tokio::spawn({
        let c = c.clone();
        async move { c.post(T2V, json!({"prompt": "x"})).await }
    });
    advance(10).await;
    let stats = c.mock.stats();
    assert_eq!(
        (stats.tasks_created, stats.responses("0")),
        (1, 0),
        "{stats:?}"
    );
    advance(20).await;
    answer.await.unwrap().data();
    assert_eq!(c.mock.stats().responses("0"), 1);
}

#[tokio::test(start_paused = true)]
async fn an_hour_of_traffic_never_exceeds_capacity() {
    let c = Caller::new(
        MockConfig::preset(Preset::Standard)
            .no_rate_limit()
            .seed(11),
    );
    let mut accepted = 0;
    let mut refused = 0;
    for _ in 0..3600 {
        match c.post(T2V, json!({"prompt": "x"})).await.code() {
            0 => accepted += 1,
            1303 => refused += 1,
            other => panic!("unexpected {other}"),
        }
        advance(1).await;
    }
    let stats = c.mock.stats();
    assert_eq!(stats.max_concurrent["video"], 3);
    assert!(refused > 0, "negative control: a greedy client is refused");
    // 3 slots × 3600 s ÷ 60..120 s per task.
    assert!((90..=181).contains(&accepted), "accepted {accepted}");
    assert_eq!(stats.requests_total, 3600);
    assert_eq!(stats.responses_by_code["1303"], refused);
}

#[tokio::test(start_paused = true)]
async fn stats_can_be_reset() {
    let c = Caller::new(quiet());
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.mock.reset_stats();
    let stats = c.mock.stats();
    assert_eq!(stats.requests_total, 0);
    assert_eq!(stats.tasks_created, 0);
    assert_eq!(stats.in_use["video"], 1);
    assert_eq!(stats.max_concurrent["video"], 1);
}

/// A client naming a new model in every create (no `known_models`) grows the stats maps keyed
/// by pool only up to `MAX_STATS_POOLS`: the models after share `video:*`, their slots and
/// task-seconds summed there, while the product pools, configured pools and the models named
/// first keep their own entries. Each name kept an entry for good, after its task was gone.
#[tokio::test(start_paused = true)]
async fn models_named_at_random_grow_the_stats_only_to_a_bound() {
    let c = Caller::new(quiet().pool_slots("video:kling-late", 2));
    let extra = 50;
    for i in 0..MAX_STATS_POOLS + extra {
        c.post(
            &format!("/text-to-video/random-{i}"),
            json!({"prompt": "x"}),
        )
        .await
        .data();
    }
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.post("/text-to-video/kling-late", json!({"prompt": "x"}))
        .await
        .data();
    let stats = c.mock.stats();
    assert_eq!(stats.tasks_created, (MAX_STATS_POOLS + extra + 2) as u64);
    for map in [
        stats.max_concurrent.keys().collect::<Vec<_>>(),
        stats.in_use.keys().collect(),
        stats.task_seconds.keys().collect(),
    ] {
        assert!(map.len() <= MAX_STATS_POOLS + 3, "{}", map.len());
    }
    assert!(stats.max_concurrent.contains_key("video:random-0"));
    assert_eq!(stats.max_concurrent["video:*"], 1, "one slot each");
    assert_eq!(stats.max_concurrent["video"], 1);
    assert_eq!(stats.max_concurrent["video:kling-late"], 1, "configured");
    let folded = stats.in_use["video:*"] as usize;
    assert!((extra..=extra + 1).contains(&folded), "{folded}");
    let seconds: f64 = stats.task_seconds.values().sum();
    assert_eq!(seconds, 100.0 * (MAX_STATS_POOLS + extra + 2) as f64);
    assert_eq!(stats.task_seconds["video:*"], 100.0 * folded as f64);
}

// Slots per pack type (KLING_API.md "Concurrency and rate"): a model's pool is one of its type.

#[tokio::test(start_paused = true)]
async fn a_model_pool_takes_its_types_capacity_before_the_default() {
    let c = Caller::new(
        quiet()
            .slots(1)
            .pool_slots("video", 2)
            .pool_slots("image", 3),
    );
    for _ in 0..2 {
        c.post("/text-to-video/kling-3.0", json!({"prompt": "x"}))
            .await
            .data();
    }
    c.post("/text-to-video/kling-3.0", json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
    c.post("/text-to-image/kolors-v2", json!({"prompt": "x", "n": 3}))
        .await
        .data();
    // A type without an override keeps the default.
    c.post(
        "/v1/images/kolors-virtual-try-on",
        json!({"human_image": "h", "cloth_image": "c"}),
    )
    .await
    .data();
    c.post(
        "/v1/images/kolors-virtual-try-on",
        json!({"human_image": "h", "cloth_image": "c"}),
    )
    .await
    .assert_error(429, 1303);
}

#[tokio::test(start_paused = true)]
async fn a_model_pools_own_capacity_wins_over_its_types() {
    let c = Caller::new(
        quiet()
            .pool_slots("video", 3)
            .pool_slots("video:kling-3.0", 1),
    );
    c.post("/text-to-video/kling-3.0", json!({"prompt": "x"}))
        .await
        .data();
    c.post("/text-to-video/kling-3.0", json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
    assert_eq!(c.mock.config().capacity("video:kling-2.6"), 3);
    assert_eq!(c.mock.config().capacity("video:kling-3.0"), 1);
    assert_eq!(
        c.mock.config().capacity("image:kolors-v2"),
        5,
        "Pro's default"
    );
}

// `/account/costs` at most once a second (KLING_API.md "Concurrency and rate").

#[tokio::test(start_paused = true)]
async fn account_costs_answer_1302_to_a_second_query_within_a_second() {
    let c = Caller::new(quiet()); // no account-wide request rate
    c.get("/account/costs").await.data();
    advance_ms(100).await;
    c.get("/account/costs").await.assert_error(429, 1302);
    // Other requests are not held by it.
    c.get(LIST).await.data();
    advance_ms(899).await;
    c.get("/account/costs").await.assert_error(429, 1302);
    advance_ms(1).await;
    c.get("/account/costs").await.data();
    // Per account: another key's account has its own.
    c.with_key("other").get("/account/costs").await.data();
}

#[tokio::test(start_paused = true)]
async fn every_preset_limits_account_costs_to_one_a_second() {
    for preset in [
        Preset::Free,
        Preset::Standard,
        Preset::Pro,
        Preset::Enterprise,
    ] {
        let config = MockConfig::preset(preset).no_rate_limit();
        assert_eq!(config.costs_per_second, Some(1.0), "{preset}");
        let c = Caller::new(config);
        c.get("/account/costs").await.data();
        advance_ms(500).await;
        c.get("/account/costs").await.assert_error(429, 1302);
        advance_ms(500).await;
        c.get("/account/costs").await.data();
    }
}

#[tokio::test(start_paused = true)]
async fn the_account_costs_limit_follows_the_speed_and_can_be_set_or_removed() {
    let fast = Caller::new(quiet().speed(10.0).retry_after(RetryAfterMode::Seconds));
    fast.get("/account/costs").await.data();
    advance_ms(50).await;
    let r = fast.get("/account/costs").await;
    r.assert_error(429, 1302);
    assert_eq!(r.headers["retry-after"], "1", "50 ms to wait, rounded up");
    advance_ms(50).await;
    fast.get("/account/costs").await.data();

    let twice = Caller::new(quiet().costs_per_second(2.0));
    twice.get("/account/costs").await.data();
    advance_ms(500).await;
    twice.get("/account/costs").await.data();

    let open = Caller::new(quiet().no_costs_limit());
    for _ in 0..5 {
        open.get("/account/costs").await.data();
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_costs_query_takes_no_turn_of_the_account_rate() {
    let c = Caller::new(quiet().rate_per_minute(600.0)); // one per 100 ms
    c.get("/account/costs").await.data();
    advance_ms(100).await;
    c.get(LIST).await.data();
    advance_ms(100).await;
    c.get("/account/costs").await.assert_error(429, 1302);
    // The refusal above left the account's turn at 200 ms free.
    c.get(LIST).await.data();
}

// Credits per period: the Free tier's 66 a day (DESIGN's tier table).

#[tokio::test(start_paused = true)]
async fn the_free_tiers_66_credits_come_back_after_a_day() {
    // 1440×: a day of API time is 60 s.
    let c = Caller::new(
        MockConfig::preset(Preset::Free)
            .no_rate_limit()
            .slots(100)
            .speed(1440.0)
            .task_duration(secs(60), secs(60)),
    );
    for _ in 0..66 {
        c.post(T2V, json!({"prompt": "x"})).await.data();
    }
    assert_eq!(c.mock.remaining_credits("test-key"), Some(0.0));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
    advance(59).await;
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
    advance(2).await;
    c.post(T2V, json!({"prompt": "x"})).await.data();
    assert_eq!(c.mock.remaining_credits("test-key"), Some(65.0));
    let pack = c.get("/account/costs").await;
    let pack = &pack.data()["resource_pack_subscribe_infos"][0];
    assert_eq!(pack["remaining_quantity"], 65.0);
    assert_eq!(pack["status"], "online");
    let valid_ms =
        pack["invalid_time"].as_u64().unwrap() - pack["effective_time"].as_u64().unwrap();
    assert_eq!(valid_ms, 60_000, "one day of API time at 1440×");
    let stats = c.mock.stats();
    assert_eq!(stats.tasks_created, 67);
    assert_eq!(
        stats.creates_after_1102, 1,
        "the one at 59 s; the one of the new day is not after an 1102"
    );
}

/// The grace before a create counts as one after the 1102 is partly network time: at least
/// 20 ms at any speed (at 1000× the scaled 100 ms would be 0.1 ms, less than a round trip).
#[tokio::test(start_paused = true)]
async fn creates_after_1102_allow_20_ms_of_real_time_at_any_speed() {
    let c = Caller::new(quiet().speed(1000.0).credits(1.0));
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
    tokio::time::advance(std::time::Duration::from_millis(15)).await;
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
    assert_eq!(c.mock.stats().creates_after_1102, 0);
    tokio::time::advance(std::time::Duration::from_millis(10)).await;
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
    assert_eq!(c.mock.stats().creates_after_1102, 1);
}

/// A create after an 1102 is counted from when the client could read the 1102, not from when
/// the mock built it. A slow 1102 is read only when it arrives: a create the client sends 5 s
/// in, answered at once, was sent before any 1102 reached it. It was counted, as the 1102
/// latched when the first create arrived.
#[tokio::test(start_paused = true)]
async fn a_create_sent_before_a_slow_1102_arrives_is_not_counted_after_it() {
    let mut checked = 0;
    for seed in 0..64 {
        let c = Caller::new(quiet().credits(0.0).slow(0.5, secs(30)).seed(seed));
        let first = tokio::spawn({
            let c = c.clone();
            async move { c.post(T2V, json!({"prompt": "a"})).await }
        });
        // Let the first create arrive at 0 s (a spawned task runs when this one yields).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(c.mock.stats().requests_total, 1, "the first create arrived");
        advance(5).await;
        if first.is_finished() {
            continue; // the first answer was not slow
        }
        let started = tokio::time::Instant::now();
        let second = c.post(T2V, json!({"prompt": "b"})).await;
        if started.elapsed() > secs(1) {
            first.await.unwrap();
            continue; // the second answer was slow too
        }
        second.assert_error(429, 1102);
        // The client has seen no 1102 before sending the second create: the first's answer
        // is still 25 s away.
        assert!(!first.is_finished());
        advance(30).await;
        first.await.unwrap().assert_error(429, 1102);
        let stats = c.mock.stats();
        assert_eq!(
            stats.creates_after_1102, 0,
            "seed {seed}: both creates were sent before any 1102 reached the client: {stats:?}"
        );
        // Control: a create sent after an 1102 was read is counted.
        c.post(T2V, json!({"prompt": "c"}))
            .await
            .assert_error(429, 1102);
        assert_eq!(c.mock.stats().creates_after_1102, 1, "seed {seed}");
        checked += 1;
    }
    assert!(checked > 0, "no seed drew slow then not slow");
}

/// A slow 1102 whose client went away before it was sent was never read: the client's next
/// create is not counted as sent after it (it was, by the time the 1102 was built).
#[tokio::test(start_paused = true)]
async fn a_slow_1102_never_sent_is_not_one_the_client_saw() {
    let c = Caller::new(quiet().credits(0.0).slow(1.0, secs(30)));
    let create = || c.post(T2V, json!({"prompt": "x"}));
    assert!(tokio::time::timeout(secs(5), create()).await.is_err());
    advance(60).await;
    let started = tokio::time::Instant::now();
    create().await.assert_error(429, 1102);
    assert_eq!(started.elapsed(), secs(30));
    let stats = c.mock.stats();
    assert_eq!(
        (stats.creates_after_1102, stats.responses("1102")),
        (0, 1),
        "the first 1102 was never sent: {stats:?}"
    );
    // Control: the second 1102 was read, 30 s after its create was sent.
    advance(1).await;
    create().await.assert_error(429, 1102);
    assert_eq!(c.mock.stats().creates_after_1102, 1);
}

/// A slow 1102 built in one credit period and sent in the next is not a latch of the new
/// period: the account has its credits back, and a create the server accepts is not counted
/// as one after an 1102.
#[tokio::test(start_paused = true)]
async fn a_slow_1102_sent_after_its_credit_period_ended_latches_nothing() {
    let c = Caller::new(
        quiet()
            .credits(1.0)
            .credit_period(secs(100))
            .slow(1.0, secs(150)),
    );
    let (first, second) = tokio::join!(
        c.post(T2V, json!({"prompt": "a"})),
        c.post(T2V, json!({"prompt": "b"})),
    );
    first.data();
    second.assert_error(429, 1102);
    advance(1).await;
    c.post(T2V, json!({"prompt": "c"})).await.data();
    let stats = c.mock.stats();
    assert_eq!(
        (stats.creates_after_1102, stats.tasks_created),
        (0, 2),
        "{stats:?}"
    );
}

/// A garbled 1102 (its status kept, its body cut: no code readable) is not one the client saw:
/// its next create, a minute later, was counted as sent after an 1102 it could not read.
#[tokio::test(start_paused = true)]
async fn a_create_after_a_garbled_1102_is_not_counted_after_it() {
    use http_body_util::{BodyExt, Full};
    use tower_service::Service;
    let mut checked = 0;
    for seed in 0..64 {
        let mut mock = crate::support::mock(quiet().credits(0.0).malformed_rate(0.5).seed(seed));
        let create = || {
            http::Request::post(T2V)
                .header("authorization", "Bearer k")
                .body(Full::new(bytes::Bytes::from_static(br#"{"prompt":"x"}"#)))
                .unwrap()
        };
        let first = mock.call(create()).await.unwrap();
        let first_body = first.into_body().collect().await.unwrap().to_bytes();
        if serde_json::from_slice::<serde_json::Value>(&first_body).is_ok() {
            continue; // the first answer was not garbled
        }
        advance(60).await;
        let second = mock.call(create()).await.unwrap();
        let body = second.into_body().collect().await.unwrap().to_bytes();
        let Ok(second) = serde_json::from_slice::<serde_json::Value>(&body) else {
            continue; // garbled too
        };
        assert_eq!(second["code"], 1102);
        let stats = mock.stats();
        assert_eq!(
            stats.creates_after_1102, 0,
            "seed {seed}: no 1102 was readable before the second create: {stats:?}"
        );
        // Control: the second 1102 was read; a create a minute later is counted.
        advance(60).await;
        mock.call(create()).await.unwrap();
        assert_eq!(mock.stats().creates_after_1102, 1, "seed {seed}");
        checked += 1;
    }
    assert!(checked > 0, "no seed drew garbled then not");
}

/// A lost 1102 (the connection closed without an answer) is not one the client saw: its next
/// create, a minute later, was counted as sent after it.
#[tokio::test(start_paused = true)]
async fn a_create_after_a_lost_1102_is_not_counted_after_it() {
    use http_body_util::Full;
    use tower_service::Service;
    let mut checked = 0;
    for seed in 0..64 {
        let mut mock = crate::support::mock(quiet().credits(0.0).lost_answer_rate(0.5).seed(seed));
        let create = || {
            http::Request::post(T2V)
                .header("authorization", "Bearer k")
                .body(Full::new(bytes::Bytes::from_static(br#"{"prompt":"x"}"#)))
                .unwrap()
        };
        if mock.call(create()).await.is_ok() {
            continue; // the first answer was not lost
        }
        advance(60).await;
        if mock.call(create()).await.is_err() {
            continue; // lost too
        }
        let stats = mock.stats();
        assert_eq!(
            (
                stats.creates_after_1102,
                stats.answers_lost,
                stats.responses("1102")
            ),
            (0, 1, 1),
            "seed {seed}: no 1102 reached the client before the second create: {stats:?}"
        );
        // Control: the second 1102 was read; a create a minute later is counted.
        advance(60).await;
        let _ = mock.call(create()).await;
        assert_eq!(mock.stats().creates_after_1102, 1, "seed {seed}");
        checked += 1;
    }
    assert!(checked > 0, "no seed drew lost then not");
}

#[tokio::test(start_paused = true)]
async fn credits_without_a_period_are_spent_for_good() {
    let free = MockConfig::preset(Preset::Free);
    assert_eq!(free.credit_period, Some(secs(24 * 3600)));
    assert_eq!(MockConfig::preset(Preset::Pro).credit_period, None);
    let c = Caller::new(
        free.no_rate_limit()
            .lifetime_credits()
            .credits(1.0)
            .speed(1440.0),
    );
    c.post(T2V, json!({"prompt": "x"})).await.data();
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
    advance(600).await; // ten days of API time
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1102);
}

#[tokio::test(start_paused = true)]
async fn a_failed_task_of_an_earlier_period_refunds_nothing_in_the_new_one() {
    // A period of 60 s; tasks of 90 s that fail.
    let c = Caller::new(
        quiet()
            .credits(2.0)
            .credit_period(secs(60))
            .failure_rate(1.0)
            .slots(10)
            .task_duration(secs(90), secs(90)),
    );
    c.post(T2V, json!({"prompt": "x"})).await.data();
    assert_eq!(c.mock.remaining_credits("test-key"), Some(1.0));
    advance(61).await;
    assert_eq!(c.mock.remaining_credits("test-key"), Some(2.0));
    c.post(T2V, json!({"prompt": "x"})).await.data();
    advance(30).await; // the first task failed at 90 s, in the second period
    assert_eq!(c.mock.remaining_credits("test-key"), Some(1.0));
    advance(30).await; // the third period (from 120 s)
    assert_eq!(c.mock.remaining_credits("test-key"), Some(2.0));
    advance(31).await; // the second task failed at 151 s, created in an earlier period
    assert_eq!(c.mock.remaining_credits("test-key"), Some(2.0));
}

#[tokio::test(start_paused = true)]
async fn a_zero_credit_period_or_costs_rate_is_refused_naming_the_field() {
    let err = kling_mock::MockKling::new(quiet().credit_period(secs(0))).unwrap_err();
    assert_eq!(err.field(), "credit_period");
    let err = kling_mock::MockKling::new(quiet().costs_per_second(0.0)).unwrap_err();
    assert_eq!(err.field(), "costs_per_second");
}

/// Past `MAX_STATS_POOLS`, a pool is keyed alike in `in_use`, `max_concurrent` and
/// `task_seconds`, whatever the order of creates and resets: every pool in use is one
/// `max_concurrent` names, and a reset (its high-water marks restarted from the slots held)
/// keeps the maps within the bound.
#[tokio::test(start_paused = true)]
async fn pools_past_the_stats_bound_are_keyed_alike_across_resets() {
    let c = Caller::new(quiet());
    let create = |i: usize| {
        let c = &c;
        async move {
            c.post(
                &format!("/text-to-video/random-{i}"),
                json!({"prompt": "x"}),
            )
            .await
            .data();
        }
    };
    let check = |stage: &str| {
        let stats = c.mock.stats();
        for pool in stats.in_use.keys().chain(stats.task_seconds.keys()) {
            assert!(stats.max_concurrent.contains_key(pool), "{stage}: {pool}");
        }
        assert!(stats.max_concurrent.len() <= MAX_STATS_POOLS + 1, "{stage}");
        stats
    };
    for i in 0..MAX_STATS_POOLS + 10 {
        create(i).await;
    }
    check("filled");
    c.mock.reset_stats();
    let stats = check("reset");
    assert_eq!(
        stats.in_use.values().sum::<u32>() as usize,
        MAX_STATS_POOLS + 10
    );
    for i in MAX_STATS_POOLS + 10..MAX_STATS_POOLS + 20 {
        create(i).await;
    }
    let stats = check("after the reset");
    assert_eq!(stats.in_use["video:*"], 20);
    assert_eq!(stats.task_seconds["video:*"], 100.0 * 10.0);
}
