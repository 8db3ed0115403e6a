use std::time::{Duration, SystemTime};

use http::Method;
use kling_core::{Code, RetryAfter};
use kling_mock::{MockConfig, MockServer, Preset, RetryAfterMode};

use crate::support::{client, send};

/// Triggers a 1302 on a mock with 1 request per minute and returns (Retry-After header, the
/// wall-clock instant kling-core says to resume at, when the first request was sent).
async fn throttled(mode: RetryAfterMode) -> (String, SystemTime, SystemTime) {
    let config = MockConfig::preset(Preset::Pro)
        .rate_per_minute(1.0)
        .retry_after(mode);
    let mock = MockServer::start(config).await.unwrap();
    let url = format!("{}/v1/videos/text2video", mock.base_url());
    let http = client();
    let sent = SystemTime::now();
    let (_, first) = send(&http, Method::POST, url.clone(), "k", r#"{"prompt":"p"}"#)
        .await
        .unwrap();
    assert!(first.is_success());
    let (response, outcome) = send(&http, Method::POST, url, "k", r#"{"prompt":"p"}"#)
        .await
        .unwrap();
    assert_eq!(outcome.code(), Code::RateLimited);
    let header = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .to_owned();
    let received = SystemTime::now();
    let resume = received + outcome.retry_after().expect("retry-after parsed");
    (header, resume, sent)
}

#[tokio::test]
async fn both_retry_after_forms_parse_back_to_the_same_instant() {
    let (seconds, by_seconds, sent_a) = throttled(RetryAfterMode::Seconds).await;
    assert!(
        matches!(
            RetryAfter::parse(seconds.as_bytes()),
            Some(RetryAfter::Delay(_))
        ),
        "{seconds}"
    );
    let (date, by_date, sent_b) = throttled(RetryAfterMode::Date).await;
    assert!(
        matches!(RetryAfter::parse(date.as_bytes()), Some(RetryAfter::At(_))),
        "{date}"
    );

    // Each mock's window opens 60 s after its first request; both forms have 1 s resolution
    // and round up, so each resume instant lies within [60 s, 61 s] plus the round trip.
    for (resume, sent) in [(by_seconds, sent_a), (by_date, sent_b)] {
        let wait = resume.duration_since(sent).unwrap();
        assert!(wait >= Duration::from_secs(59), "{wait:?}");
        assert!(wait <= Duration::from_millis(62_500), "{wait:?}");
    }
    let (a, b) = (
        by_seconds.duration_since(sent_a).unwrap(),
        by_date.duration_since(sent_b).unwrap(),
    );
    let difference = a.abs_diff(b);
    assert!(difference <= Duration::from_millis(1_500), "{a:?} vs {b:?}");
}
