//! No create leaves after the account's `1102`: not one that reaches the stack later, nor one
//! that already had its slot and was waiting for its turn in the rate limiter.

use kling_concurrency::error::Halted;
use kling_core::error::may_have_created;
use kling_mock::{MockConfig, MockKling, Preset};
use kling_tower::{Credentials, KlingLayer, StackConfig, Tier};
use tower::{Layer, ServiceExt};

use crate::support::request;

/// Five creates at once on the Pro stack, against an account with one credit left: the first
/// is made, the second meets `1102`, and the other three, each granted its slot at once (Pro
/// has five) and queued behind the rate limiter's one-a-second pace, are refused unsent, as
/// the halted account's later creates are.
#[tokio::test(start_paused = true)]
async fn creates_queued_in_the_rate_limiter_are_not_sent_after_a_1102() {
    let mock = MockKling::new(MockConfig::preset(Preset::Pro).credits(1.0)).unwrap();
    let kling = KlingLayer::new(
        StackConfig::preset(Tier::Pro),
        Credentials::api_key("k").unwrap(),
    )
    .unwrap();
    let service = kling.layer(mock.clone());
    let creates: Vec<_> = (0..5)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move {
                let body = format!(r#"{{"prompt":"job {i}"}}"#);
                service
                    .oneshot(request("POST", "/text-to-video/kling-3.0", &body))
                    .await
            })
        })
        .collect();
    let mut made = 0;
    let mut refused_unsent = 0;
    for create in creates {
        match create.await.unwrap() {
            Ok(response) if kling_core::Outcome::of(&response).is_some_and(|o| o.is_success()) => {
                made += 1
            }
            Ok(response) => panic!("answered {:?}", kling_core::Outcome::of(&response)),
            Err(error) => {
                let halted = std::iter::successors(
                    Some(&*error as &(dyn std::error::Error + 'static)),
                    |e| e.source(),
                )
                .any(|e| e.is::<Halted>() || e.to_string().contains("1102"));
                assert!(halted, "{error}");
                if !may_have_created(&*error) {
                    refused_unsent += 1;
                }
            }
        }
    }
    let stats = mock.stats();
    assert_eq!(made, 1, "{stats:?}");
    assert_eq!(
        stats.responses("1102"),
        1,
        "one create met the 1102: {stats:?}"
    );
    assert_eq!(stats.creates_after_1102, 0, "{stats:?}");
    assert_eq!(
        refused_unsent, 4,
        "the 1102 and the three held back made nothing"
    );
    // The halted account's slots all came back.
    assert_eq!(kling.snapshot().pool("video:kling-3.0").unwrap().in_use, 1);
}
