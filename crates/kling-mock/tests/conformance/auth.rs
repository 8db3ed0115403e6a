//! API keys and the legacy HS256 JWT (1000, 1002, 1003, 1004), signed here by hand.
//!
//! KLING_API.md "Auth": header `{"alg":"HS256","typ":"JWT"}`, claims `iss` = access key,
//! `exp` = now + 1800 s, `nbf` = now − 5 s.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit as _, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::{Caller, advance, quiet, secs};

const AK: &str = "ak-test";
const SK: &str = "sk-test";
const T2V: &str = "/v1/videos/text2video";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn jwt(claims: &Value, secret: &str) -> String {
    jwt_with_header(&json!({"alg": "HS256", "typ": "JWT"}), claims, secret)
}

fn jwt_with_header(header: &Value, claims: &Value, secret: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(header.to_string());
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signed.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signed}.{sig}")
}

fn good_claims() -> Value {
    json!({"iss": AK, "exp": now() + 1800, "nbf": now() - 5})
}

fn caller() -> Caller {
    Caller::new(quiet().access_key(AK, SK))
}

#[tokio::test(start_paused = true)]
async fn a_valid_jwt_is_accepted_and_its_account_is_the_access_key() {
    let c = caller().with_key(&jwt(&good_claims(), SK));
    c.post(T2V, json!({"prompt": "x"})).await.data();
    assert_eq!(c.mock.in_use(AK, "video"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_valid_jwt_belongs_to_the_named_account_when_one_is_set() {
    let c = Caller::new(quiet().access_key(AK, SK).account("acme"));
    let c = c.with_key(&jwt(&good_claims(), SK));
    c.post(T2V, json!({"prompt": "x"})).await.data();
    assert_eq!(c.mock.in_use("acme", "video"), 1);
    assert_eq!(c.mock.in_use(AK, "video"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_jwt_with_a_bad_signature_is_401_1000() {
    let c = caller().with_key(&jwt(&good_claims(), "other-secret"));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1000);
}

#[tokio::test(start_paused = true)]
async fn a_jwt_of_another_access_key_is_401_1002() {
    let claims = json!({"iss": "someone-else", "exp": now() + 1800, "nbf": now() - 5});
    let c = caller().with_key(&jwt(&claims, SK));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1002);
}

#[tokio::test(start_paused = true)]
async fn a_jwt_not_yet_valid_is_401_1003() {
    let claims = json!({"iss": AK, "exp": now() + 1800, "nbf": now() + 120});
    let c = caller().with_key(&jwt(&claims, SK));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1003);
}

#[tokio::test(start_paused = true)]
async fn server_clock_skew_makes_a_fresh_token_not_yet_valid() {
    let c = Caller::new(quiet().access_key(AK, SK).clock_offset_secs(-60))
        .with_key(&jwt(&good_claims(), SK));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1003);
}

#[tokio::test(start_paused = true)]
async fn an_expired_jwt_is_401_1004() {
    let claims = json!({"iss": AK, "exp": now() - 1, "nbf": now() - 1805});
    let c = caller().with_key(&jwt(&claims, SK));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1004);
}

#[tokio::test(start_paused = true)]
async fn a_non_jwt_bearer_needs_a_configured_api_key_when_ak_sk_are_set() {
    let c = caller();
    c.with_key("plain")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1002);
}

#[tokio::test(start_paused = true)]
async fn an_api_key_and_ak_sk_share_one_account() {
    let c = Caller::new(
        crate::support::quiet()
            .access_key(AK, SK)
            .api_key("api-key")
            .slots(1),
    );
    c.with_key("api-key")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data();
    c.with_key(&jwt(&good_claims(), SK))
        .post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
}

#[tokio::test(start_paused = true)]
async fn two_api_keys_of_one_account_share_its_slots() {
    let c = Caller::new(quiet().api_key("k1").api_key("k2").slots(1));
    c.with_key("k1")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data();
    c.with_key("k2")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
}

#[tokio::test(start_paused = true)]
async fn in_open_mode_each_key_is_its_own_account() {
    let c = Caller::new(quiet().slots(1));
    c.with_key("a")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data();
    c.with_key("b")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data();
    c.with_key("a")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
}

/// With no keys configured any bearer is an account of its own, and a JWT is the account of its
/// issuer whatever secret signed it, but its header and times are checked as with keys: an
/// expired token is 1004, one not yet valid 1003, one of another shape 1000. Every JWT passed,
/// so a client that never re-signed worked against the default mock for good.
#[tokio::test(start_paused = true)]
async fn in_open_mode_a_jwt_is_checked_for_all_but_its_signature() {
    let c = Caller::new(quiet());
    c.with_key(&jwt(&good_claims(), "any-secret"))
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data();
    assert_eq!(c.mock.in_use(AK, "video"), 1);
    let refused = [
        (
            json!({"iss": AK, "exp": now() - 1, "nbf": now() - 1805}),
            1004,
        ),
        (
            json!({"iss": AK, "exp": now() + 1800, "nbf": now() + 120}),
            1003,
        ),
        (
            json!({"iss": AK, "exp": (now() + 1800) * 1000, "nbf": now() - 5}),
            1000,
        ),
        (json!({"iss": AK, "exp": now() + 1800}), 1000),
        (json!({"exp": now() + 1800, "nbf": now() - 5}), 1000),
    ];
    for (claims, code) in refused {
        c.with_key(&jwt(&claims, SK))
            .post(T2V, json!({"prompt": "x"}))
            .await
            .assert_error(401, code);
    }
    let header = json!({"alg": "HS256"});
    c.with_key(&jwt_with_header(&header, &good_claims(), SK))
        .post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1000);
    assert_eq!(c.mock.stats().tasks_created, 1);
}

// The token's shape as KLING_API.md "Auth" gives it: anything else is refused, so a client
// regression cannot pass against the mock.

#[tokio::test(start_paused = true)]
async fn a_jwt_with_exp_in_milliseconds_is_401_1000() {
    let claims = json!({"iss": AK, "exp": (now() + 1800) * 1000, "nbf": now() - 5});
    let c = caller().with_key(&jwt(&claims, SK));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1000);
    assert_eq!(c.mock.stats().tasks_created, 0);
}

#[tokio::test(start_paused = true)]
async fn a_jwt_valid_for_a_day_is_401_1000() {
    let claims = json!({"iss": AK, "exp": now() + 24 * 3600, "nbf": now() - 5});
    let c = caller().with_key(&jwt(&claims, SK));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1000);
}

#[tokio::test(start_paused = true)]
async fn a_client_clock_a_few_minutes_ahead_is_tolerated() {
    // Signed by a client whose clock runs 4 minutes ahead and which backdates `nbf` by 5
    // minutes for skew (with `nbf` = now − 5 s it would get 1003): `exp` is 2040 s away for
    // the mock.
    let ahead = now() + 240;
    let claims = json!({"iss": AK, "exp": ahead + 1800, "nbf": ahead - 300});
    let c = caller().with_key(&jwt(&claims, SK));
    c.post(T2V, json!({"prompt": "x"})).await.data();
    // Ten minutes ahead is not.
    let ahead = now() + 600;
    let claims = json!({"iss": AK, "exp": ahead + 1800, "nbf": ahead - 700});
    let c = caller().with_key(&jwt(&claims, SK));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1000);
}

#[tokio::test(start_paused = true)]
async fn a_jwt_in_milliseconds_throughout_is_not_yet_valid() {
    let claims = json!({"iss": AK, "exp": (now() + 1800) * 1000, "nbf": (now() - 5) * 1000});
    let c = caller().with_key(&jwt(&claims, SK));
    c.post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1003);
}

#[tokio::test(start_paused = true)]
async fn a_jwt_without_nbf_or_exp_is_401_1000() {
    for claims in [
        json!({"iss": AK, "exp": now() + 1800}),
        json!({"iss": AK, "nbf": now() - 5}),
        json!({"iss": AK, "exp": "soon", "nbf": now() - 5}),
    ] {
        let c = caller().with_key(&jwt(&claims, SK));
        c.post(T2V, json!({"prompt": "x"}))
            .await
            .assert_error(401, 1000);
    }
}

/// A token without an `iss` (or with one that is not a string) is malformed, 1000, with keys
/// as in open mode; only an `iss` of another access key is 1002. With keys it was 1002, as if
/// it named another key, while the README and open mode gave 1000.
#[tokio::test(start_paused = true)]
async fn a_jwt_without_iss_is_401_1000_with_keys_as_in_open_mode() {
    for claims in [
        json!({"exp": now() + 1800, "nbf": now() - 5}),
        json!({"iss": 7, "exp": now() + 1800, "nbf": now() - 5}),
    ] {
        let token = jwt(&claims, SK);
        for c in [caller(), Caller::new(quiet())] {
            c.with_key(&token)
                .post(T2V, json!({"prompt": "x"}))
                .await
                .assert_error(401, 1000);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_jwt_header_without_typ_jwt_or_alg_hs256_is_401_1000() {
    for header in [
        json!({"alg": "HS256"}),
        json!({"alg": "HS256", "typ": "JWS"}),
        json!({"typ": "JWT"}),
        json!({"alg": "none", "typ": "JWT"}),
    ] {
        let c = caller().with_key(&jwt_with_header(&header, &good_claims(), SK));
        c.post(T2V, json!({"prompt": "x"}))
            .await
            .assert_error(401, 1000);
    }
}

/// KLING_API.md "Auth": the API key is the only option on new-style endpoints. A legacy JWT,
/// however valid, is refused there (401 code 1000), with keys configured or in open mode, and
/// makes no task; on a legacy endpoint it still works, as an API key does on both.
#[tokio::test(start_paused = true)]
async fn a_jwt_on_a_new_style_endpoint_is_401_1000() {
    let t2v_new = "/text-to-video/kling-3.0";
    for config in [quiet().access_key(AK, SK).api_key("api-key"), quiet()] {
        let c = Caller::new(config);
        let token = c.with_key(&jwt(&good_claims(), SK));
        let key = c.with_key("api-key");
        let task = key.post(t2v_new, json!({"prompt": "x"})).await;
        let id = task.data()["id"].as_str().unwrap().to_owned();
        key.get(&format!("/tasks?task_ids={id}")).await.data();
        key.post("/tasks", json!({})).await.data();

        let refused = [
            token.post(t2v_new, json!({"prompt": "x"})).await,
            token.get(&format!("/tasks?task_ids={id}")).await,
            token.post("/tasks", json!({})).await,
        ];
        for reply in refused {
            reply.assert_error(401, 1000);
            let message = reply.body["message"].as_str().unwrap();
            assert!(message.contains("API key"), "{message}");
        }
        assert_eq!(c.mock.stats().tasks_created, 1);
        // The same token on a legacy endpoint is let in.
        token.post(T2V, json!({"prompt": "x"})).await.data();
        assert_eq!(c.mock.stats().tasks_created, 2);
    }
}

/// A model that is a dot segment (`..`, `%2E`) or holds a `%2F` names no new-style endpoint:
/// a server normalizing its paths removes the one and splits at the other before routing, and
/// kling-core's router reads no endpoint there, so a client signing JWTs sends them. The mock
/// answers 404 code 1202 with a JWT as with an API key, and makes no task, rather than a 401
/// that blames the credentials; the negative control is `kling-3.0`, which is 401 1000 with
/// the JWT.
#[tokio::test(start_paused = true)]
async fn a_model_no_server_routes_is_404_1202_whatever_the_credentials() {
    let c = Caller::new(quiet().access_key(AK, SK).api_key("api-key"));
    let token = c.with_key(&jwt(&good_claims(), SK));
    let key = c.with_key("api-key");
    for model in ["..", ".", "%2E%2E", "kling%2F3.0", "%2f"] {
        let path = format!("/text-to-video/{model}");
        for caller in [&token, &key] {
            caller
                .post(&path, json!({"prompt": "x"}))
                .await
                .assert_error(404, 1202);
        }
    }
    assert_eq!(c.mock.stats().tasks_created, 0);
    token
        .post("/text-to-video/kling-3.0", json!({"prompt": "x"}))
        .await
        .assert_error(401, 1000);
}

/// A configured API key is that key whatever its shape: one that reads as a JWT (three
/// base64url parts, the first two JSON objects; an issuer's keys may be JWTs themselves) is let
/// in on new-style endpoints as on legacy ones, with an access key pair configured or not,
/// rather than refused as a JWT there or checked as the pair's token. The negative control:
/// the same token, not configured as a key, is refused as a JWT on the new-style endpoint.
#[tokio::test(start_paused = true)]
async fn an_api_key_shaped_like_a_jwt_is_a_key() {
    let t2v_new = "/text-to-video/kling-3.0";
    let key = jwt(&json!({"sub": "issued-key"}), "issuer-secret");
    for config in [
        quiet().api_key(key.clone()),
        quiet().access_key(AK, SK).api_key(key.clone()),
    ] {
        let c = Caller::new(config).with_key(&key);
        c.post(t2v_new, json!({"prompt": "x"})).await.data();
        c.post(T2V, json!({"prompt": "x"})).await.data();
        assert_eq!(c.mock.stats().tasks_created, 2);
    }
    let c = Caller::new(quiet().api_key("another-key")).with_key(&key);
    c.post(t2v_new, json!({"prompt": "x"}))
        .await
        .assert_error(401, 1000);
}

/// The secrets a mock is configured with (API keys, the legacy secret key, callback secrets)
/// never show in its `Debug`, nor in its server's: a test that logs `{:?}` of its mock or
/// config printed them all (STYLE: no secrets in logs or `Debug`).
#[tokio::test(start_paused = true)]
async fn the_debug_of_a_mock_shows_no_secret() {
    let config = quiet()
        .api_key("APIKEYSECRET")
        .api_key_for("OTHERKEYSECRET", "acme")
        .access_key("ak-visible", "SECRETKEYSECRET")
        .callback_secret("whsec_CALLBACKSECRET")
        .callback_rotated_secret("ROTATEDSECRET");
    let mock = kling_mock::MockKling::new(config.clone()).unwrap();
    for text in [format!("{config:?}"), format!("{mock:?}")] {
        for secret in [
            "APIKEYSECRET",
            "OTHERKEYSECRET",
            "SECRETKEYSECRET",
            "CALLBACKSECRET",
            "ROTATEDSECRET",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        // What is not secret still shows: the access key (the JWT's `iss`) and the accounts.
        assert!(
            text.contains("ak-visible") && text.contains("acme"),
            "{text}"
        );
    }
}

/// Open mode keeps at most `max_open_accounts` accounts: a new token beyond it forgets the
/// least recently seen idle account (its list goes; its task stays queryable by id). Every
/// token added an account for good, so a long-running mock fed fresh tokens grew without bound.
#[tokio::test(start_paused = true)]
async fn in_open_mode_a_new_key_beyond_the_cap_forgets_the_least_recently_seen_idle_account() {
    let c = Caller::new(quiet().slots(1).max_open_accounts(2));
    let task_a = c
        .with_key("a")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.with_key("b")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data();
    advance(101).await;
    // Both idle now; `b` was seen last, so `c` forgets `a`.
    assert_eq!(
        c.with_key("b")
            .get(T2V)
            .await
            .data()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    c.with_key("c").get(T2V).await.data();
    assert_eq!(
        c.with_key("b")
            .get(T2V)
            .await
            .data()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // `a` comes back a fresh account (forgetting `c`, now the least recently seen): its list is
    // empty, its task still answers by id.
    assert!(
        c.with_key("a")
            .get(T2V)
            .await
            .data()
            .as_array()
            .unwrap()
            .is_empty()
    );
    let found = c.with_key("a").get(&format!("{T2V}/{task_a}")).await;
    assert_eq!(found.data()["task_status"], "succeed");
    assert_eq!(
        c.with_key("b")
            .get(T2V)
            .await
            .data()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// An account with a task running is never forgotten: with every account busy a new token is
/// refused, 503 code 5001 naming the limit, until a task ends.
#[tokio::test(start_paused = true)]
async fn in_open_mode_a_busy_account_is_kept_and_a_new_key_waits_for_an_idle_one() {
    let c = Caller::new(quiet().slots(1).max_open_accounts(2));
    c.with_key("a")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data();
    c.with_key("b")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data();
    for key in ["c", "d", "e"] {
        let refused = c.with_key(key).get(T2V).await;
        refused.assert_error(503, 5001);
        assert!(
            refused.body["message"]
                .as_str()
                .unwrap()
                .contains("2 accounts")
        );
    }
    // `a` kept its running task and its slot.
    c.with_key("a")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
    advance(101).await;
    c.with_key("c").get(T2V).await.data();
}

/// The cap is open mode's only: configured keys name their accounts, all kept.
#[tokio::test(start_paused = true)]
async fn with_configured_keys_every_account_is_kept_whatever_the_cap() {
    let c = Caller::new(
        quiet()
            .slots(1)
            .max_open_accounts(1)
            .api_key_for("k1", "one")
            .api_key_for("k2", "two"),
    );
    c.with_key("k1")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data();
    c.with_key("k2")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .data();
    c.with_key("k1")
        .post(T2V, json!({"prompt": "x"}))
        .await
        .assert_error(429, 1303);
}

/// Forgetting an account must not lift what holds it: switches set for it, slots another
/// tenant occupies, or a request-rate limit not yet at rest (a client locked out cannot escape
/// by waiting for a new token).
#[tokio::test(start_paused = true)]
async fn in_open_mode_an_account_under_switches_occupation_or_rate_limit_is_kept() {
    let c = Caller::new(quiet().rate_per_minute(60.0).max_open_accounts(1));
    c.mock
        .set_account_switches("a", kling_mock::Switches::new().arrears(true));
    c.with_key("b").get(T2V).await.assert_error(503, 5001);
    c.mock
        .set_account_switches("a", kling_mock::Switches::new());
    c.mock.occupy("a", "video", 1, secs(10));
    c.with_key("b").get(T2V).await.assert_error(503, 5001);
    advance(10).await;
    c.with_key("b").get(T2V).await.data();
    // `b` was let in this instant: its rate limit is not at rest for one interval.
    c.with_key("c").get(T2V).await.assert_error(503, 5001);
    advance(1).await;
    c.with_key("c").get(T2V).await.data();
}

/// An account within a rate lockout is not at rest either, though its rate limit is.
#[tokio::test(start_paused = true)]
async fn in_open_mode_an_account_within_a_rate_lockout_is_kept() {
    let c = Caller::new(
        quiet()
            .rate_per_minute(60.0)
            .rate_lockout(secs(5))
            .max_open_accounts(1),
    );
    let a = c.with_key("a");
    a.get(T2V).await.data();
    a.get(T2V).await.assert_error(429, 1302);
    advance(2).await;
    c.with_key("b").get(T2V).await.assert_error(503, 5001);
    a.get(T2V).await.assert_error(429, 1302);
    advance(3).await;
    c.with_key("b").get(T2V).await.data();
}

/// No account at all would refuse every open-mode request: refused, naming the field.
#[tokio::test(start_paused = true)]
async fn a_zero_open_account_cap_is_refused_naming_the_field() {
    let err = kling_mock::MockKling::new(quiet().max_open_accounts(0)).unwrap_err();
    assert_eq!(err.field(), "max_open_accounts");
}
