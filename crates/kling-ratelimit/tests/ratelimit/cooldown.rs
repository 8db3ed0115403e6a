//! Cooldown: a 1302 or a `Retry-After` pauses the whole key, escalating within a ceiling.

use std::time::{Duration, SystemTime};

use kling_core::BoxError;
use kling_core::ClassifyLayer;
use kling_core::error::{BodyTooLarge, MalformedResponse, Transport};
use kling_ratelimit::error::RateLimited;
use kling_ratelimit::{Adaptive, BucketKey, Cooldown, GcraLayer, Quota};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support::{Reply, Req, Res, Server, ms, request, send, spawn_call};

/// Four requests of account `a` queued at once behind a first answer, and one of `b`.
async fn pause_after(first: Reply) -> Vec<(String, u128)> {
    queued_behind(first, GcraLayer::new(Quota::per_second(10.0)).unwrap()).await
}

/// [`pause_after`] through `layer`: when each request reached the server.
async fn queued_behind<Bk>(first: Reply, layer: GcraLayer<Bk>) -> Vec<(String, u128)>
where
    Bk: kling_ratelimit::Backend,
{
    let server = Server::new();
    server.script([first]);
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for tag in ["a1", "a2", "a3", "a4"] {
        calls.push(spawn_call(&service, request(Some("a"), tag)).await);
    }
    calls.push(spawn_call(&service, request(Some("b"), "b1")).await);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // A new request of `a` after the pause started waits for it too.
    server.times_ms(start)
}

/// The in-process backend with reports that arrive one poll late, as a remote store's do.
#[derive(Debug, Default)]
struct LateReports(kling_ratelimit::InProcess);

/// A report that is pending on its first poll.
struct Late(
    Option<Result<kling_ratelimit::backend::Reported, kling_ratelimit::error::BackendError>>,
    bool,
);

impl std::future::Future for Late {
    type Output = Result<kling_ratelimit::backend::Reported, kling_ratelimit::error::BackendError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if !self.1 {
            self.1 = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(self.0.take().expect("polled once more"))
    }
}

impl kling_ratelimit::Backend for LateReports {
    type AcquireFuture = <kling_ratelimit::InProcess as kling_ratelimit::Backend>::AcquireFuture;
    type FeedbackFuture = Late;

    fn acquire(&self, key: &BucketKey, policy: &kling_ratelimit::Policy) -> Self::AcquireFuture {
        self.0.acquire(key, policy)
    }

    fn feedback(
        &self,
        key: &BucketKey,
        policy: &kling_ratelimit::Policy,
        feedback: kling_ratelimit::Feedback,
    ) -> Self::FeedbackFuture {
        Late(Some(Ok(self.0.feedback_now(key, policy, feedback))), false)
    }
}

/// A backend whose report is still to come when the response is in: the response waits for it
/// (boxed beside it), then the pause holds as with the in-process backend.
#[tokio::test(start_paused = true)]
async fn a_report_that_comes_later_still_pauses_the_key() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .backend(LateReports::default())
        .build()
        .unwrap();
    assert_eq!(
        queued_behind(Reply::throttled(), layer).await,
        expected(1000)
    );
}

fn expected(pause_ms: u128) -> Vec<(String, u128)> {
    vec![
        ("a1".into(), 0),
        ("b1".into(), 0),
        ("a2".into(), pause_ms),
        ("a3".into(), pause_ms + 100),
        ("a4".into(), pause_ms + 200),
    ]
}

#[tokio::test(start_paused = true)]
async fn a_1302_pauses_every_request_of_the_key_and_none_of_another() {
    // Without the pause a2..a4 would go at 100, 200, 300 ms; the first pause is 1 s.
    assert_eq!(pause_after(Reply::throttled()).await, expected(1000));
}

#[tokio::test(start_paused = true)]
async fn retry_after_in_seconds_pauses_the_key_until_then() {
    let reply = Reply::throttled().header("retry-after", "3");
    assert_eq!(pause_after(reply).await, expected(3000));
    // Any refusal with a Retry-After pauses the key, not only a 1302 (a success's does not:
    // `a_retry_after_on_a_success_pauses_nothing`).
    let reply = Reply::status(503, 5001).header("retry-after", "2");
    assert_eq!(pause_after(reply).await, expected(2000));
}

#[tokio::test(start_paused = true)]
async fn retry_after_as_an_http_date_pauses_the_key_until_then() {
    let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let reply = Reply::throttled()
        .header("date", httpdate_fmt(date))
        .header("retry-after", httpdate_fmt(date + Duration::from_secs(5)));
    assert_eq!(pause_after(reply).await, expected(5000));
}

fn httpdate_fmt(t: SystemTime) -> String {
    // IMF-fixdate without a dependency: the epoch day and the civil date from it.
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][month as usize - 1];
    format!(
        "{weekday}, {day:02} {name} {year} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[tokio::test(start_paused = true)]
async fn consecutive_1302s_escalate_within_the_ceiling_and_a_success_resets() {
    let server = Server::new();
    server.script([
        Reply::throttled(),
        Reply::throttled(),
        Reply::throttled(),
        Reply::throttled(),
        Reply::ok(),
        Reply::throttled(),
    ]);
    let cooldown = Cooldown::new().ceiling(Duration::from_secs(45));
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .cooldown(cooldown)
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    for i in 0..7 {
        service
            .clone()
            .oneshot(request(Some("a"), &i.to_string()))
            .await
            .unwrap();
    }
    let times: Vec<u128> = server.times_ms(start).into_iter().map(|(_, t)| t).collect();
    // Pauses: 1 s, 2 s, then the burst backoff 30 s, then 60 s capped at the 45 s ceiling;
    // the success resets the streak, so the next 1302 pauses 1 s again.
    assert_eq!(times, vec![0, 1000, 3000, 33_000, 78_000, 78_100, 79_100]);
}

#[tokio::test(start_paused = true)]
async fn in_flight_1302s_do_not_escalate_the_pause() {
    let server = Server::with_latency(Duration::from_millis(50));
    server.script([Reply::throttled(), Reply::throttled(), Reply::throttled()]);
    let layer = GcraLayer::new(Quota::per_second(10.0).with_burst(3)).unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for tag in ["x", "y", "z", "next"] {
        calls.push(spawn_call(&service, request(Some("a"), tag)).await);
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // Three sent together, all refused: one pause of 1 s from the first refusal.
    let times = server.times_ms(start);
    assert_eq!(times.last().unwrap(), &("next".to_owned(), 1050));
    let key = BucketKey::account(Some("a".into()));
    assert_eq!(
        handle.backend().key_state(&key).unwrap().streak,
        0,
        "reset by the success"
    );
}

/// A success of a request sent before a pause began says nothing about the rate after it, as a
/// 1302 sent then does not escalate it: it leaves the streak running, so the next 1302 after
/// the pause escalates (2 s) instead of starting over (1 s).
#[tokio::test(start_paused = true)]
async fn a_success_sent_before_the_pause_leaves_its_streak_running() {
    let server = Server::with_latency(Duration::from_millis(50));
    server.script([Reply::throttled(), Reply::ok(), Reply::throttled()]);
    let layer = GcraLayer::new(Quota::per_second(10.0).with_burst(3)).unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    // "x" meets a 1302 (a pause of 1 s from its answer at 50 ms); "y", sent 10 ms after it and
    // so before the pause began, succeeds at 60 ms, while the streak runs.
    let x = spawn_call(&service, request(Some("a"), "x")).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let y = spawn_call(&service, request(Some("a"), "y")).await;
    let first = [x, y];
    for call in first {
        call.await.unwrap().unwrap();
    }
    let key = BucketKey::account(Some("a".into()));
    assert_eq!(handle.backend().key_state(&key).unwrap().streak, 1);
    // After the pause, "z" meets a 1302: the second of the streak, a 2 s pause.
    for tag in ["z", "next"] {
        service
            .clone()
            .oneshot(request(Some("a"), tag))
            .await
            .unwrap();
    }
    let times = server.times_ms(start);
    assert_eq!(
        times,
        vec![
            ("x".to_owned(), 0),
            ("y".to_owned(), 10),
            ("z".to_owned(), 1050),
            ("next".to_owned(), 3100)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn reject_mode_reports_the_cooldown() {
    let server = Server::new();
    server.script([Reply::throttled().header("retry-after", "4")]);
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .reject()
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    service
        .clone()
        .oneshot(request(Some("a"), "1"))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    let err = service
        .clone()
        .oneshot(request(Some("a"), "2"))
        .await
        .unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert!(limited.in_cooldown());
    assert_eq!(limited.retry_after(), Duration::from_secs(3));
    service
        .clone()
        .oneshot(request(Some("b"), "3"))
        .await
        .unwrap();
}

/// The in-process backend as a store another process shares: it says a 1302 streak is running
/// for account `a` while `running` is set, and records the successes reported to it.
#[derive(Debug, Default)]
struct SharedStreak {
    inner: kling_ratelimit::InProcess,
    running: std::sync::atomic::AtomicBool,
    successes: std::sync::Mutex<Vec<Option<String>>>,
}

impl kling_ratelimit::Backend for SharedStreak {
    type AcquireFuture = <kling_ratelimit::InProcess as kling_ratelimit::Backend>::AcquireFuture;
    type FeedbackFuture = <kling_ratelimit::InProcess as kling_ratelimit::Backend>::FeedbackFuture;

    fn acquire(&self, key: &BucketKey, policy: &kling_ratelimit::Policy) -> Self::AcquireFuture {
        self.inner.acquire(key, policy)
    }

    fn streak_running(&self, key: &BucketKey) -> bool {
        key.account_id().is_some_and(|a| a.as_str() == "a")
            && self.running.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn feedback(
        &self,
        key: &BucketKey,
        policy: &kling_ratelimit::Policy,
        feedback: kling_ratelimit::Feedback,
    ) -> Self::FeedbackFuture {
        if matches!(feedback, kling_ratelimit::Feedback::Success { .. }) {
            self.successes
                .lock()
                .unwrap()
                .push(key.account_id().map(|a| a.to_string()));
        }
        self.inner.feedback(key, policy, feedback)
    }
}

/// A process that never received a pause reports its successes of an account while the
/// backend says a streak (another process's) is running for it, so the success resets the
/// streak; otherwise it reports none.
#[tokio::test(start_paused = true)]
async fn successes_are_reported_while_the_backend_says_a_streak_is_running() {
    let server = Server::new();
    let layer = GcraLayer::builder(Quota::per_second(100.0))
        .backend(SharedStreak::default())
        .build()
        .unwrap();
    let service = layer.layer(server.service());
    let backend = || layer.handle();
    service
        .clone()
        .oneshot(request(Some("a"), "a1"))
        .await
        .unwrap();
    assert!(backend().backend().successes.lock().unwrap().is_empty());
    backend()
        .backend()
        .running
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::advance(Duration::from_millis(20)).await;
    service
        .clone()
        .oneshot(request(Some("a"), "a2"))
        .await
        .unwrap();
    service.oneshot(request(Some("b"), "b1")).await.unwrap();
    assert_eq!(
        *backend().backend().successes.lock().unwrap(),
        [Some("a".to_owned())],
        "a's success only: no streak runs for b"
    );
}

/// A proxy's 429, in the two shapes a gateway sends (Kong's JSON, nginx's HTML).
const PROXY_429_PAGES: [&str; 2] = [
    r#"{"message":"API rate limit exceeded"}"#,
    "<html><head><title>429 Too Many Requests</title></head><body>Too Many Requests</body></html>",
];

/// `page` answers a first request of account `a` through the classify step, which makes it a
/// [`MalformedResponse`] (returned); 200 ms later one more request of `a` and one of `b` are
/// sent: when each request reached the server, by tag.
async fn after_page<Bk>(
    page: Reply,
    layer: &GcraLayer<Bk>,
) -> (MalformedResponse, Vec<(String, u128)>)
where
    Bk: kling_ratelimit::Backend,
{
    let server = Server::new();
    server.script([page]);
    let service = layer.layer(ClassifyLayer::new().layer(server.service()));
    let start = Instant::now();
    let error = service
        .clone()
        .oneshot(request(Some("a"), "a1"))
        .await
        .unwrap_err();
    let page = error
        .downcast_ref::<MalformedResponse>()
        .expect("the classify step's error, unchanged")
        .clone();
    // Without a pause a2 would go at once: one 100 ms interval has passed since a1.
    tokio::time::advance(ms(200)).await;
    let a2 = spawn_call(&service, request(Some("a"), "a2")).await;
    let b1 = spawn_call(&service, request(Some("b"), "b1")).await;
    a2.await.unwrap().unwrap();
    b1.await.unwrap().unwrap();
    let mut times = server.times_ms(start);
    times.sort();
    (page, times)
}

fn paused_until(pause_ms: u128) -> Vec<(String, u128)> {
    vec![
        ("a1".into(), 0),
        ("a2".into(), pause_ms.max(200)),
        ("b1".into(), 200),
    ]
}

/// A proxy's 429 page with `Retry-After` has no Kling envelope, so it reaches this layer as the
/// classify step's error: it pauses the whole key as a 1302 with the same header does (no
/// thundering herd against the throttling proxy), and counts as a rate refusal.
#[tokio::test(start_paused = true)]
async fn a_proxys_429_page_with_retry_after_pauses_the_key_until_then() {
    for body in PROXY_429_PAGES {
        let layer = GcraLayer::new(Quota::per_second(10.0)).unwrap();
        let start = Instant::now();
        let (page, times) =
            after_page(Reply::page(429, body).header("retry-after", "60"), &layer).await;
        assert_eq!(page.status(), 429);
        assert_eq!(times, paused_until(60_000), "{body}");
        assert_eq!(page.resume_at(), Some(start + Duration::from_secs(60)));
    }
}

/// A proxy's 429 page too long for the classify step to read ([`BodyTooLarge`]) is an answer
/// all the same: its `Retry-After` pauses the key as a short page's does.
#[tokio::test(start_paused = true)]
async fn a_proxys_429_page_too_long_to_read_pauses_the_key_until_its_retry_after() {
    let layer = GcraLayer::new(Quota::per_second(10.0)).unwrap();
    let server = Server::new();
    // nginx's page, 92 bytes, over a limit of 64.
    server.script([Reply::page(429, PROXY_429_PAGES[1]).header("retry-after", "60")]);
    let classify = ClassifyLayer::new().max_body_bytes(64);
    let service = layer.layer(classify.layer(server.service()));
    let start = Instant::now();
    let error = service
        .clone()
        .oneshot(request(Some("a"), "a1"))
        .await
        .unwrap_err();
    let page = error
        .downcast_ref::<BodyTooLarge>()
        .expect("the classify step's error, unchanged");
    assert_eq!(page.retry_after(), Some(Duration::from_secs(60)));
    tokio::time::advance(ms(200)).await;
    let a2 = spawn_call(&service, request(Some("a"), "a2")).await;
    let b1 = spawn_call(&service, request(Some("b"), "b1")).await;
    a2.await.unwrap().unwrap();
    b1.await.unwrap().unwrap();
    let mut times = server.times_ms(start);
    times.sort();
    assert_eq!(times, paused_until(60_000));
}

/// The same through a backend whose reports come one poll later, as a shared store's
/// (kling-redis) do: the error waits for its report, then the pause holds.
#[tokio::test(start_paused = true)]
async fn a_proxys_429_page_pauses_the_key_through_a_backend_that_reports_later() {
    let layer = GcraLayer::builder(Quota::per_second(10.0))
        .backend(LateReports::default())
        .build()
        .unwrap();
    let page = Reply::page(429, PROXY_429_PAGES[0]).header("retry-after", "60");
    assert_eq!(after_page(page, &layer).await.1, paused_until(60_000));
}

/// A 429 page without `Retry-After` is a rate refusal all the same: the key pauses as after a
/// 1302 without one (1 s), and the streak counts it.
#[tokio::test(start_paused = true)]
async fn a_proxys_429_page_without_retry_after_pauses_like_a_1302() {
    let layer = GcraLayer::new(Quota::per_second(10.0)).unwrap();
    let handle = layer.handle();
    let server = Server::new();
    server.script([Reply::page(429, PROXY_429_PAGES[1]), Reply::throttled()]);
    let service = layer.layer(ClassifyLayer::new().layer(server.service()));
    let start = Instant::now();
    let first = service.clone().oneshot(request(Some("a"), "a1")).await;
    assert!(first.unwrap_err().is::<MalformedResponse>());
    let key = BucketKey::account(Some("a".into()));
    assert_eq!(handle.backend().key_state(&key).unwrap().streak, 1);
    // The 1302 that follows is the second of a streak: 2 s.
    for tag in ["a2", "a3"] {
        service
            .clone()
            .oneshot(request(Some("a"), tag))
            .await
            .unwrap();
    }
    assert_eq!(
        server.times_ms(start),
        [("a1".into(), 0), ("a2".into(), 1000), ("a3".into(), 3000)]
    );
}

/// A 503 page (maintenance) pauses the key for its `Retry-After` only: it is no rate refusal,
/// so it neither starts a streak nor lowers an adaptive rate; without the header, and for any
/// other page without one, nothing pauses.
#[tokio::test(start_paused = true)]
async fn a_proxys_503_page_pauses_only_for_its_retry_after() {
    let adaptive = || {
        GcraLayer::builder(Quota::per_second(10.0))
            .adaptive(Adaptive::new().start(Quota::per_second(10.0)))
            .build()
            .unwrap()
    };
    let key = BucketKey::account(Some("a".into()));
    let html = "<html><body>503 Service Temporarily Unavailable</body></html>";

    let layer = adaptive();
    let (_, times) = after_page(Reply::page(503, html).header("retry-after", "2"), &layer).await;
    assert_eq!(times, paused_until(2000));
    let state = layer.handle().backend().key_state(&key).unwrap();
    assert_eq!(state.streak, 0);
    assert_eq!(state.adaptive_rate, Some(10.0), "not lowered");

    for page in [
        Reply::page(503, html),
        Reply::page(502, "<html>502 Bad Gateway</html>"),
        Reply::page(404, "<html>404 Not Found</html>"),
    ] {
        let (_, times) = after_page(page, &adaptive()).await;
        assert_eq!(times, paused_until(0));
    }

    // A 429 page lowers the adaptive rate, as a 1302 does.
    let layer = adaptive();
    after_page(Reply::page(429, PROXY_429_PAGES[0]), &layer).await;
    let rate = layer
        .handle()
        .backend()
        .key_state(&key)
        .unwrap()
        .adaptive_rate;
    assert!(rate.is_some_and(|r| r < 10.0), "{rate:?}");
}

/// A layer between (here one that wraps every error in a [`Transport`]) hides the page's error
/// in its chain: the page is found there and still pauses the key.
#[tokio::test(start_paused = true)]
async fn a_proxys_page_wrapped_by_another_layer_still_pauses_the_key() {
    let layer = GcraLayer::new(Quota::per_second(10.0)).unwrap();
    let server = Server::new();
    server.script([Reply::page(429, PROXY_429_PAGES[0]).header("retry-after", "60")]);
    let wrapped = ClassifyLayer::new()
        .layer(server.service())
        .map_err(|e| Box::new(Transport::new(e)) as kling_core::BoxError);
    let service = layer.layer(wrapped);
    let start = Instant::now();
    let error = service
        .clone()
        .oneshot(request(Some("a"), "a1"))
        .await
        .unwrap_err();
    assert!(error.is::<Transport>(), "{error}");
    tokio::time::advance(ms(200)).await;
    service
        .clone()
        .oneshot(request(Some("a"), "a2"))
        .await
        .unwrap();
    assert_eq!(
        server.times_ms(start),
        [("a1".into(), 0), ("a2".into(), 60_000)]
    );
}

/// The layer alone, with no classify step below, gets a proxy's 429 page as a response: it
/// reads the page itself and pauses the key for its `Retry-After` as it does for the classify
/// step's error, counting it as a rate refusal (the streak), and passes the page up unchanged.
#[tokio::test(start_paused = true)]
async fn a_proxys_429_page_reaching_the_layer_as_a_response_pauses_the_key() {
    for body in PROXY_429_PAGES {
        let layer = GcraLayer::new(Quota::per_second(10.0)).unwrap();
        let handle = layer.handle();
        let server = Server::new();
        server.script([Reply::page(429, body).header("retry-after", "60")]);
        let service = layer.layer(server.service());
        let start = Instant::now();
        let page = service
            .clone()
            .oneshot(request(Some("a"), "a1"))
            .await
            .unwrap();
        assert_eq!(page.status(), 429);
        let key = BucketKey::account(Some("a".into()));
        assert_eq!(
            handle.backend().key_state(&key).unwrap().streak,
            1,
            "{body}"
        );
        tokio::time::advance(ms(200)).await;
        let a2 = spawn_call(&service, request(Some("a"), "a2")).await;
        let b1 = spawn_call(&service, request(Some("b"), "b1")).await;
        a2.await.unwrap().unwrap();
        b1.await.unwrap().unwrap();
        let mut times = server.times_ms(start);
        times.sort();
        assert_eq!(times, paused_until(60_000), "{body}");
    }
}

/// A request that would wait out a pause after a 1302 past its maximum wait is refused with an
/// error that says it was a pause, of which account, and how long it had left.
#[tokio::test(start_paused = true)]
async fn a_wait_refused_during_a_pause_says_so_and_names_the_account() {
    let server = Server::new();
    server.script([Reply::throttled().header("retry-after", "60")]);
    let service = GcraLayer::builder(Quota::per_second(10.0))
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(server.service());
    service
        .clone()
        .oneshot(request(Some("a"), "a1"))
        .await
        .unwrap();
    let error = service
        .clone()
        .oneshot(request(Some("a"), "a2"))
        .await
        .unwrap_err();
    let exceeded = error
        .downcast_ref::<kling_ratelimit::error::WaitExceeded>()
        .unwrap_or_else(|| panic!("{error}"));
    assert!(exceeded.in_cooldown(), "{exceeded}");
    assert_eq!(exceeded.account().map(|a| a.as_str()), Some("a"));
    assert_eq!(exceeded.wait(), Duration::from_secs(60));
    assert_eq!(
        exceeded.to_string(),
        "rate limit wait of account a would pass the maximum wait: next turn in 60s \
         (the account is paused after a 1302 or a Retry-After)"
    );
}

/// A request that gives up while queued behind a head waiting out a pause says the wait was a
/// pause too, and when the pause ends (the head's next turn).
#[tokio::test(start_paused = true)]
async fn a_wait_refused_in_the_queue_behind_a_pause_says_so() {
    use kling_core::signals::Deadline;

    let server = Server::new();
    server.script([Reply::throttled().header("retry-after", "60")]);
    let service = GcraLayer::builder(Quota::per_second(10.0))
        .build()
        .unwrap()
        .layer(server.service());
    let start = Instant::now();
    service
        .clone()
        .oneshot(request(Some("a"), "a1"))
        .await
        .unwrap();
    // The head waits the pause out (no limit); the one behind it may wait 10 s.
    let head = spawn_call(&service, request(Some("a"), "a2")).await;
    let mut behind = request(Some("a"), "a3");
    behind
        .extensions_mut()
        .insert(Deadline(start + Duration::from_secs(10)));
    let error = service.clone().oneshot(behind).await.unwrap_err();
    let exceeded = error
        .downcast_ref::<kling_ratelimit::error::WaitExceeded>()
        .unwrap_or_else(|| panic!("{error}"));
    assert!(exceeded.was_queued());
    assert_eq!(exceeded.resume_at(), start + Duration::from_secs(60));
    assert!(exceeded.in_cooldown(), "{exceeded}");
    assert!(
        exceeded
            .to_string()
            .ends_with("(the account is paused after a 1302 or a Retry-After)"),
        "{exceeded}"
    );
    head.await.unwrap().unwrap();
    assert_eq!(server.tags(), vec!["a1", "a2"]);
}

/// A request of account `a` tagged `tag` whose deadline is `secs` after `start`.
fn due_by(start: Instant, tag: &str, secs: u64) -> Req {
    let mut req = request(Some("a"), tag);
    req.extensions_mut().insert(kling_core::signals::Deadline(
        start + Duration::from_secs(secs),
    ));
    req
}

/// Checks that `error` refused a request queued behind a pause, naming `resume_at`, the
/// pause's end, as when it could have gone.
fn assert_refused_behind_a_pause(error: &BoxError, resume_at: Instant) {
    let exceeded = error
        .downcast_ref::<kling_ratelimit::error::WaitExceeded>()
        .unwrap_or_else(|| panic!("{error}"));
    assert!(
        exceeded.was_queued() && exceeded.in_cooldown(),
        "{exceeded}"
    );
    assert_eq!(exceeded.resume_at(), resume_at);
}

/// Spawns, in this order, `a1`, `a2` (the head once `a1` is sent), `a3` due by `short_secs`
/// and `a4` due by 4000 s, all of account `a`.
async fn a_head_and_two_behind<S>(
    service: &S,
    start: Instant,
    short_secs: u64,
) -> [JoinHandle<Result<Res, BoxError>>; 4]
where
    S: tower::Service<Req, Response = Res, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    [
        spawn_call(service, request(Some("a"), "a1")).await,
        spawn_call(service, request(Some("a"), "a2")).await,
        spawn_call(service, due_by(start, "a3", short_secs)).await,
        spawn_call(service, due_by(start, "a4", 4000)).await,
    ]
}

/// Waits for every one of `calls` to succeed.
async fn all_succeed(calls: impl IntoIterator<Item = JoinHandle<Result<Res, BoxError>>>) {
    for call in calls {
        call.await.unwrap().unwrap();
    }
}

/// Checks the end of [`a_head_and_two_behind`] meeting a pause until 3600.5 s: `a3` fails
/// `refused_after` from `start` (`when` says why then), behind the pause; the rest are sent,
/// `a2` when the pause ends and `a4` at `a4_at_ms`.
async fn only_the_short_one_refused(
    calls: [JoinHandle<Result<Res, BoxError>>; 4],
    server: &Server,
    start: Instant,
    (refused_after, when): (Duration, &str),
    a4_at_ms: u128,
) {
    let [first, head, short, long] = calls;
    let error = short.await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), refused_after, "{when}");
    assert_refused_behind_a_pause(&error, start + ms(3_600_500));
    all_succeed([first, head, long]).await;
    assert_eq!(
        server.times_ms(start),
        vec![
            ("a1".into(), 0),
            ("a2".into(), 3_600_500),
            ("a4".into(), a4_at_ms)
        ]
    );
}

/// A request that joins the queue behind a head waiting out a pause that ends after the
/// request's deadline fails at once: it cannot be sent before the pause ends, and it waited
/// until its deadline for nothing (100 s, against a `Retry-After: 3600`). One whose deadline
/// comes after the pause's end waits it out and is sent; one behind a head that is only paced
/// (a quota change may still make it sooner) waits for its limit as before.
#[tokio::test(start_paused = true)]
async fn a_request_queued_behind_a_pause_past_its_deadline_fails_at_once() {
    let server = Server::new();
    server.script([Reply::throttled().header("retry-after", "3600")]);
    let layer = GcraLayer::builder(Quota::per_second(10.0)).build().unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    send(&service, request(Some("a"), "a1")).await.unwrap();
    // The head waits the pause out (no limit).
    let head = spawn_call(&service, request(Some("a"), "a2")).await;
    let error = send(&service, due_by(start, "a3", 100)).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "failed at once");
    assert_refused_behind_a_pause(&error, start + Duration::from_secs(3600));
    assert_eq!(handle.waiting(), 1, "the failed request left its place");
    // Control: a deadline after the pause's end waits it out.
    let late = spawn_call(&service, due_by(start, "a4", 4000)).await;
    all_succeed([head, late]).await;
    assert_eq!(
        server.times_ms(start),
        vec![
            ("a1".into(), 0),
            ("a2".into(), 3_600_000),
            ("a4".into(), 3_600_100)
        ]
    );

    // Behind a head that is only paced, the request waits for its limit.
    let slow = GcraLayer::new(Quota::per_minute(1.0)).unwrap();
    let service = slow.layer(Server::new().service());
    let start = Instant::now();
    send(&service, request(Some("b"), "b1")).await.unwrap();
    let _head = spawn_call(&service, request(Some("b"), "b2")).await;
    let mut paced = request(Some("b"), "b3");
    paced.extensions_mut().insert(kling_core::signals::Deadline(
        start + Duration::from_secs(10),
    ));
    let error = send(&service, paced).await.unwrap_err();
    assert!(
        error.is::<kling_ratelimit::error::WaitExceeded>(),
        "{error}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

/// A request already queued behind a head that is only paced fails as soon as that head meets
/// a pause ending past the request's deadline, not at the deadline. The pause here is one this
/// layer never saw an answer for (another process's 1302, through a store the fleet shares):
/// the head meets it when it asks at the end of its pacing. The request slept until its limit
/// and was not told of the pause: behind `Retry-After: 3600`, it held its caller 100 s. One
/// whose deadline comes after the pause's end still waits it out and is sent.
#[tokio::test(start_paused = true)]
async fn a_request_queued_behind_a_paced_head_fails_once_the_head_meets_a_pause_past_its_deadline()
{
    use kling_ratelimit::Feedback;

    let server = Server::with_latency(ms(500));
    let layer = GcraLayer::new(Quota::per_second(1.0)).unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    // a2 leads, paced until 1 s; a3 and a4 queue behind it while it is only paced.
    let calls = a_head_and_two_behind(&service, start, 100).await;
    // At 500 ms another process's 1302 pauses the account until 3600.5 s.
    tokio::time::sleep(ms(500)).await;
    let key = BucketKey::account(Some(kling_core::AccountId::new("a")));
    let now = Instant::now();
    let pause = Feedback::Pause {
        sent_at: now,
        received_at: now,
        resume_at: Some(now + Duration::from_secs(3600)),
        throttled: true,
    };
    handle
        .backend()
        .feedback_now(&key, &handle.policy(&key), pause);
    let met = (Duration::from_secs(1), "failed when the head met the pause");
    only_the_short_one_refused(calls, &server, start, met, 3_601_500).await;
}

/// The pause need not wait for the head to meet it: under a per-minute quota the head is paced
/// for up to a minute, and a 1302 that comes back meanwhile pauses the account at once. A
/// request queued behind that head with a deadline before the pause's end fails when the
/// pause is reported, with the pause's end as its resume time; it slept until its deadline
/// and then named the head's pacing instant (60 s), not the pause, as when it could go. One
/// whose deadline comes after the pause's end keeps its place and is sent, in order. Alike
/// when the report is still on its way (a remote store's round trip).
#[tokio::test(start_paused = true)]
async fn a_request_queued_behind_a_paced_head_fails_when_a_pause_past_its_deadline_is_reported() {
    let quota = Quota::per_minute(1.0);
    paced_head_then_reported_pause(GcraLayer::new(quota).unwrap()).await;
    let late = GcraLayer::builder(quota).backend(LateReports::default());
    paced_head_then_reported_pause(late.build().unwrap()).await;
}

/// [`a_request_queued_behind_a_paced_head_fails_when_a_pause_past_its_deadline_is_reported`]
/// through `layer`.
async fn paced_head_then_reported_pause<Bk>(layer: GcraLayer<Bk>)
where
    Bk: kling_ratelimit::Backend,
{
    let server = Server::with_latency(ms(500));
    server.script([Reply::throttled().header("retry-after", "3600")]);
    let service = layer.layer(server.service());
    let start = Instant::now();
    // a1 goes at once; its 1302 comes back at 500 ms and pauses the account until 3600.5 s.
    // a2 leads, paced until 60 s; a3 and a4 queue behind it.
    let calls = a_head_and_two_behind(&service, start, 30).await;
    let reported = (ms(500), "failed when the pause was reported");
    only_the_short_one_refused(calls, &server, start, reported, 3_660_500).await;
}

/// Under a long pause a request queued behind its head is woken only when something changes
/// for it, never in a loop: when the pause is first reported (another one behind the head
/// cannot wait it out, and fails then), not again as two more 1302s extend it within its
/// deadline, nor when the head meets the pause, and when its turn comes. Over an hour's pause
/// it is polled a handful of times, and it keeps its place: sent after the head, in order.
#[tokio::test(start_paused = true)]
async fn a_request_queued_behind_a_long_pause_is_not_woken_in_a_loop() {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    /// Counts the polls of the future it wraps.
    struct Counted<F>(Pin<Box<F>>, Arc<AtomicUsize>);

    impl<F: std::future::Future> std::future::Future for Counted<F> {
        type Output = F::Output;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.as_mut().poll(cx)
        }
    }

    let server = Server::with_latency(ms(500));
    server.script([
        Reply::throttled().header("retry-after", "3600"),
        Reply::throttled().header("retry-after", "3600"),
        Reply::throttled().header("retry-after", "3600"),
    ]);
    let quota = Quota::per_minute(3.0).with_burst(3);
    let service = GcraLayer::new(quota).unwrap().layer(server.service());
    let start = Instant::now();
    // a1 to a3 go 100 ms apart; their 1302s come back at 500, 600 and 700 ms, each pausing
    // `a` 3600 s from then: until 3600.7 s in the end.
    let mut burst = Vec::new();
    for tag in ["a1", "a2", "a3"] {
        burst.push(spawn_call(&service, request(Some("a"), tag)).await);
        tokio::time::sleep(ms(100)).await;
    }
    // a4 leads, paced until 20 s; a5 and a6 queue behind it.
    let head = spawn_call(&service, request(Some("a"), "a4")).await;
    let polls = Arc::new(AtomicUsize::new(0));
    let counted = Counted(
        Box::pin(service.clone().oneshot(due_by(start, "a5", 10_000))),
        Arc::clone(&polls),
    );
    let patient = tokio::spawn(counted);
    let short = spawn_call(&service, due_by(start, "a6", 100)).await;
    let error = short.await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), ms(500), "{error}");
    all_succeed(burst).await;
    head.await.unwrap().unwrap();
    patient.await.unwrap().unwrap();
    assert_eq!(
        server.tags()[3..],
        ["a4".to_owned(), "a5".to_owned()],
        "in order"
    );
    assert_eq!(server.times_ms(start)[3].1, 3_600_700, "a4 after the pause");
    // Its first poll, the wake at the first report, its turn, its pacing, its answer. (a6,
    // failing at once at 500 ms, noted its limit and left it behind: each extension woke
    // every waiter again, 6 polls.)
    assert_eq!(polls.load(Ordering::SeqCst), 5);
}

/// Requests queued behind a pause go out spaced at the quota's rate when it ends, not a whole
/// burst at once into the server that just refused: the burst builds up again from the end of
/// the pause. A request that comes long after the pause finds its burst whole again.
#[tokio::test(start_paused = true)]
async fn requests_queued_behind_a_pause_go_spaced_when_it_ends() {
    let server = Server::new();
    server.script([Reply::throttled()]);
    let layer = GcraLayer::new(Quota::per_second(10.0).with_burst(5)).unwrap();
    let service = layer.layer(server.service());
    let start = Instant::now();
    let mut calls = Vec::new();
    for tag in ["a0", "a1", "a2", "a3", "a4"] {
        calls.push(spawn_call(&service, request(Some("a"), tag)).await);
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // The first pause is 1 s; then one every 100 ms (before: a1..a4 all at 1000 ms).
    let times: Vec<u128> = server.times_ms(start).into_iter().map(|(_, t)| t).collect();
    assert_eq!(times, vec![0, 1000, 1100, 1200, 1300]);
    // Long after, the burst of five is whole again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let again = Instant::now();
    let mut calls = Vec::new();
    for n in 0..5 {
        calls.push(spawn_call(&service, request(Some("a"), &format!("b{n}"))).await);
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let burst: Vec<u128> = server
        .times_ms(again)
        .into_iter()
        .skip(5)
        .map(|(_, t)| t)
        .collect();
    assert_eq!(burst, vec![0; 5]);
}

/// The same when the pause is over before the next request asks, on a thread that remembers
/// the key (the decision without the lock: the requests share one `AccountId`, as a stack's
/// do): it goes with the burst spent at the pause's end, and the next ones an interval apart.
#[tokio::test(start_paused = true)]
async fn a_pause_that_ended_spends_the_burst_for_a_thread_that_remembers_the_key() {
    let server = Server::new();
    server.script([Reply::throttled().header("retry-after", "2")]);
    let layer = GcraLayer::new(Quota::per_second(10.0).with_burst(3)).unwrap();
    let service = layer.layer(server.service());
    let account = kling_core::AccountId::new("a");
    let of_a = |tag: &str| {
        let mut req = request(None, tag);
        req.extensions_mut().insert(account.clone());
        req
    };
    let start = Instant::now();
    service.clone().oneshot(of_a("a0")).await.unwrap();
    tokio::time::sleep(ms(2050)).await;
    let mut calls = Vec::new();
    for tag in ["a1", "a2", "a3"] {
        calls.push(spawn_call(&service, of_a(tag)).await);
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // The burst, spent at 2 s, has refilled half an interval by 2.05 s.
    let times: Vec<u128> = server.times_ms(start).into_iter().map(|(_, t)| t).collect();
    assert_eq!(times, vec![0, 2050, 2100, 2200]);
}

/// 1302s that keep coming after each pause keep the streak at the ceiling: the window counts
/// from the end of the last pause, so neither the 60 s ceiling (as long as the default window)
/// nor a `Retry-After` longer than the window ends the streak and drops the pause back to 1 s.
#[tokio::test(start_paused = true)]
async fn the_streak_window_counts_from_the_end_of_the_last_pause() {
    let server = Server::with_latency(ms(50));
    server.script((0..6).map(|_| Reply::throttled()));
    let service = GcraLayer::new(Quota::per_second(10.0))
        .unwrap()
        .layer(server.service());
    let start = Instant::now();
    for n in 0..7 {
        service
            .clone()
            .oneshot(request(Some("a"), &n.to_string()))
            .await
            .unwrap();
    }
    let times: Vec<u128> = server.times_ms(start).into_iter().map(|(_, t)| t).collect();
    // Pauses from each answer (50 ms after its sending): 1 s, 2 s, 30 s, then 60 s (the
    // ceiling) for good; before, the fifth 1302 came 60.05 s after the fourth and paused 1 s.
    assert_eq!(times, vec![0, 1050, 3100, 33_150, 93_200, 153_250, 213_300]);

    let server = Server::new();
    server.script([
        Reply::throttled().header("retry-after", "120"),
        Reply::throttled(),
    ]);
    let service = GcraLayer::new(Quota::per_second(10.0))
        .unwrap()
        .layer(server.service());
    let start = Instant::now();
    for n in 0..3 {
        service
            .clone()
            .oneshot(request(Some("a"), &n.to_string()))
            .await
            .unwrap();
    }
    let times: Vec<u128> = server.times_ms(start).into_iter().map(|(_, t)| t).collect();
    // The second 1302 in a row pauses 2 s (before: 1 s, a new streak).
    assert_eq!(times, vec![0, 120_000, 122_000]);
}

/// A `Retry-After` date already past pauses nothing by itself: a 503 with one does not pause
/// the key, and a 1302 with one pauses for the 1302's escalation.
#[tokio::test(start_paused = true)]
async fn a_retry_after_date_in_the_past_asks_for_no_pause() {
    let past = "Wed, 01 Jan 2025 00:00:00 GMT";
    let reply = Reply::status(503, 5001)
        .header("date", "Wed, 01 Jan 2025 00:00:10 GMT")
        .header("retry-after", past);
    assert_eq!(pause_after(reply).await, unpaused());
    let reply = Reply::throttled().header("retry-after", past);
    assert_eq!(pause_after(reply).await, expected(1000));
}

/// [`pause_after`]'s requests when the first answer pauses nothing: `a` paced alone.
fn unpaused() -> Vec<(String, u128)> {
    vec![
        ("a1".into(), 0),
        ("b1".into(), 0),
        ("a2".into(), 100),
        ("a3".into(), 200),
        ("a4".into(), 300),
    ]
}

/// A success's `Retry-After` pauses nothing: the request was not refused, and RFC 9110 gives
/// the header on a 2xx no meaning for other requests (an API that answers a create `202` with
/// one says when to poll that task). Before, it paused the whole account: a gateway adding
/// `Retry-After: 30` to each create's answer held every request of the account 30 s after
/// each create.
#[tokio::test(start_paused = true)]
async fn a_retry_after_on_a_success_pauses_nothing() {
    let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for reply in [
        Reply::ok().header("retry-after", "30"),
        Reply::status(202, 0).header("retry-after", "30"),
        Reply::ok()
            .header("date", httpdate_fmt(date))
            .header("retry-after", httpdate_fmt(date + Duration::from_secs(5))),
    ] {
        assert_eq!(pause_after(reply).await, unpaused());
    }
}

/// Code 0 on a 429 or a 503 is no 2xx: the status refused the request, and its `Retry-After`
/// (RFC 6585, RFC 9110 §10.2.3) pauses the key as any refusal's does, whatever the body's
/// code says (a gateway's page in the envelope's shape, a status set over a Kling body). The
/// success rule above is for a 2xx only; reading `code 0` alone as not refused let such an
/// answer's `Retry-After: 2` pause nothing.
#[tokio::test(start_paused = true)]
async fn code_0_on_a_refusing_status_pauses_for_its_retry_after() {
    for status in [429, 503] {
        let reply = Reply::status(status, 0).header("retry-after", "2");
        assert_eq!(pause_after(reply).await, expected(2000), "{status}");
    }
}

/// A success with a `Retry-After` is a success all the same: it resets the 1302 streak, so the
/// next 1302 pauses 1 s again, not 2 s. (Before, it was reported as a pause, not a success,
/// and the streak ran on.)
#[tokio::test(start_paused = true)]
async fn a_success_with_retry_after_resets_the_streak() {
    let server = Server::new();
    server.script([
        Reply::throttled(),
        Reply::ok().header("retry-after", "0"),
        Reply::throttled(),
    ]);
    let layer = GcraLayer::new(Quota::per_second(10.0)).unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    for i in 0..4 {
        let tag = i.to_string();
        service
            .clone()
            .oneshot(request(Some("a"), &tag))
            .await
            .unwrap();
        if i == 1 {
            let key = BucketKey::account(Some("a".into()));
            assert_eq!(handle.backend().key_state(&key).unwrap().streak, 0);
        }
    }
    let times: Vec<u128> = server.times_ms(start).into_iter().map(|(_, t)| t).collect();
    assert_eq!(times, vec![0, 1000, 1100, 2100]);
}

/// The head of a paused key's queue giving up during the pause hands the head on: the next
/// one goes when the pause ends, and one that came at its end queues behind the others.
#[tokio::test(start_paused = true)]
async fn a_head_that_gives_up_during_a_pause_hands_its_turn_on() {
    let server = Server::new();
    server.script([Reply::throttled()]);
    let layer = GcraLayer::new(Quota::per_second(10.0)).unwrap();
    let handle = layer.handle();
    let service = layer.layer(server.service());
    let start = Instant::now();
    service
        .clone()
        .oneshot(request(Some("a"), "first"))
        .await
        .unwrap();
    let head = spawn_call(&service, request(Some("a"), "head")).await;
    let second = spawn_call(&service, request(Some("a"), "second")).await;
    let third = spawn_call(&service, request(Some("a"), "third")).await;
    tokio::time::sleep(ms(500)).await;
    head.abort();
    tokio::time::sleep(ms(500)).await;
    let late = spawn_call(&service, request(Some("a"), "late")).await;
    second.await.unwrap().unwrap();
    third.await.unwrap().unwrap();
    late.await.unwrap().unwrap();
    assert_eq!(
        server.times_ms(start),
        vec![
            ("first".into(), 0),
            ("second".into(), 1000),
            ("third".into(), 1100),
            ("late".into(), 1200),
        ]
    );
    assert_eq!((handle.waiting(), handle.queue_bytes()), (0, 0));
}
