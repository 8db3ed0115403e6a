use http::Method;
use kling_core::{Code, Disposition};
use kling_mock::{MockConfig, MockServer, Preset};

use crate::support::{client, jwt, send};

#[tokio::test]
async fn the_create_after_credits_run_out_gets_1102_and_so_does_every_later_one() {
    let config = MockConfig::preset(Preset::Pro)
        .no_rate_limit()
        .slots(10)
        .credits(3.0);
    let mock = MockServer::start(config).await.unwrap();
    let url = format!("{}/v1/videos/text2video", mock.base_url());
    let http = client();

    for _ in 0..3 {
        let (_, outcome) = send(&http, Method::POST, url.clone(), "k", r#"{"prompt":"p"}"#)
            .await
            .unwrap();
        assert!(outcome.is_success());
    }
    for _ in 0..3 {
        let (response, outcome) = send(&http, Method::POST, url.clone(), "k", r#"{"prompt":"p"}"#)
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(outcome.code(), Code::ResourcePackExhausted);
        assert_eq!(outcome.disposition(), Disposition::Fatal);
        assert!(outcome.code().halts_creates());
        assert!(outcome.request_id().is_some());
    }
    assert_eq!(mock.stats().tasks_created, 3);
    assert_eq!(mock.stats().responses_by_code.get("1102"), Some(&3));
}

#[tokio::test]
async fn jwts_are_checked_expired_gets_1004_and_early_gets_1003() {
    let config = MockConfig::preset(Preset::Pro)
        .no_rate_limit()
        .access_key("ak-test", "sk-test");
    let mock = MockServer::start(config).await.unwrap();
    let url = format!("{}/v1/videos/text2video", mock.base_url());
    let http = client();
    let body = r#"{"prompt":"p"}"#;

    let good = jwt("ak-test", "sk-test", -5, 1800);
    let (_, ok) = send(&http, Method::POST, url.clone(), &good, body)
        .await
        .unwrap();
    assert!(ok.is_success(), "{:?}", ok.to_result());

    let expired = jwt("ak-test", "sk-test", -3600, -60);
    let (response, outcome) = send(&http, Method::POST, url.clone(), &expired, body)
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(outcome.code(), Code::TokenExpired);
    assert_eq!(outcome.disposition(), Disposition::Resign);

    let early = jwt("ak-test", "sk-test", 600, 1800);
    let (_, outcome) = send(&http, Method::POST, url.clone(), &early, body)
        .await
        .unwrap();
    assert_eq!(outcome.code(), Code::TokenNotYetValid);

    let wrong_secret = jwt("ak-test", "not-the-secret", -5, 1800);
    let (_, outcome) = send(&http, Method::POST, url.clone(), &wrong_secret, body)
        .await
        .unwrap();
    assert_eq!(outcome.disposition(), Disposition::Fatal);
    assert!(matches!(
        outcome.code(),
        Code::AuthFailed | Code::InvalidKey
    ));

    let unknown_issuer = jwt("someone-else", "sk-test", -5, 1800);
    let (_, outcome) = send(&http, Method::POST, url, &unknown_issuer, body)
        .await
        .unwrap();
    assert_eq!(outcome.code(), Code::InvalidKey);
}
