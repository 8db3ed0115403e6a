//! A Redis that refuses the configured credentials (a wrong password, none given to a server
//! that requires one, a password changed on the server): a configuration error, said so at
//! connect and at run time, never taken for an unreachable Redis.

use std::time::Duration;

use kling_concurrency::SlotsConfig;
use kling_concurrency::backend::{SlotBackend, SlotKey};
use kling_core::{AccountId, Pool, Product};
use kling_ratelimit::backend::Feedback;
use kling_ratelimit::error::BackendErrorKind;
use kling_ratelimit::{Backend, BucketKey, Cooldown, Decision, Policy, Quota};
use kling_redis::error::StoreErrorKind;
use kling_redis::testing::RedisServer;
use kling_redis::{Connection, RedisConfig, RedisGcra, RedisSlots, WhenUnreachable};

use crate::support::{raw, redis};

/// `redis://[:password@]127.0.0.1:PORT/` of `server`.
fn url(server: &RedisServer, password: Option<&str>) -> String {
    match password {
        Some(password) => format!("redis://:{password}@127.0.0.1:{}/", server.port()),
        None => server.url(),
    }
}

/// Sets the server's password on `conn` (authenticated, or opened before any was set).
async fn require_password(conn: &mut redis::aio::MultiplexedConnection, password: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(password)
        .query_async(conn)
        .await
        .unwrap();
}

/// Changes the server's password from `old-pw` to `new-pw` and drops every other client's
/// connection: their next connections are refused. The connection returned can set it back.
async fn change_password(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let mut admin = redis::Client::open(url(server, Some("old-pw")))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    require_password(&mut admin, "new-pw").await;
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut admin)
        .await
        .unwrap();
    admin
}

fn config(url: String) -> RedisConfig {
    RedisConfig::new(url)
        .prefix("test")
        .command_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
}

/// `connect` with a wrong password, or none, fails at once with its own kind, says the server
/// refused the `url`'s credentials, and never shows the password; the right one connects.
#[tokio::test]
async fn connect_says_the_server_refused_the_urls_password_without_showing_it() {
    let Some(server) = redis() else { return };
    require_password(&mut raw(&server).await, "s3cret-pw").await;

    let error = Connection::connect(config(url(&server, Some("wrong-pw"))))
        .await
        .unwrap_err();
    let shown = format!("{error} {error:?}");
    assert_eq!(error.kind(), StoreErrorKind::AuthRefused, "{shown}");
    assert!(!error.is_unreachable(), "{shown}");
    assert!(shown.contains("`url`"), "{shown}");
    assert!(shown.contains("refused the password"), "{shown}");
    assert!(!shown.contains("wrong-pw"), "{shown}");

    let error = Connection::connect(config(url(&server, None)))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::AuthRefused, "{error}");
    assert!(
        error
            .to_string()
            .contains("requires a password and `url` gives none"),
        "{error}"
    );

    Connection::connect(config(url(&server, Some("s3cret-pw"))))
        .await
        .expect("the right password connects");
}

/// The password changed on the server under a running process (its connection dropped, the
/// new one refused): rate-limiter decisions and task-slot creates fail at once with the
/// refusal in every `WhenUnreachable` mode — no silent wait, no silent fallback — and work
/// again once the server accepts the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_changed_on_the_server_fails_at_once_in_every_mode() {
    let Some(server) = redis() else { return };
    require_password(&mut raw(&server).await, "old-pw").await;
    let conn = Connection::connect(config(url(&server, Some("old-pw"))))
        .await
        .unwrap();
    let key = BucketKey::account(Some(AccountId::new("a")));
    let policy = Policy::new(Quota::per_second(1000.0), Cooldown::default());
    let modes = [
        WhenUnreachable::Wait,
        WhenUnreachable::Fail,
        WhenUnreachable::fallback(2),
    ];
    let gcras = modes.map(|mode| RedisGcra::new(conn.clone()).when_unreachable(mode));
    let slots = modes.map(|mode| {
        RedisSlots::new(conn.clone(), SlotsConfig::new(5))
            .unwrap()
            .when_unreachable(mode)
    });
    assert_eq!(
        gcras[0].acquire(&key, &policy).await.unwrap(),
        Decision::Admit
    );

    let mut admin = change_password(&server).await;

    for (gcra, mode) in gcras.iter().zip(modes) {
        // The first command after the kill may find the connection dropped (unreachable for
        // a moment); the next ones reach the server and are refused.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let error = loop {
            match gcra.acquire(&key, &policy).await {
                Err(error) => break error,
                Ok(Decision::NotBefore { at, .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep_until(at).await;
                }
                Ok(decision) if tokio::time::Instant::now() < deadline => {
                    assert!(!gcra.is_out(), "{mode:?}: {decision:?} from the fallback");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("{mode:?}: still no error after 3 s: {other:?}"),
            }
        };
        assert_eq!(
            error.kind(),
            BackendErrorKind::Protocol,
            "{mode:?}: {error}"
        );
        let store = error.store_error().to_string();
        assert!(
            store.contains("refused authentication"),
            "{mode:?}: {store}"
        );
        assert!(!store.contains("old-pw"), "{store}");
    }
    let pool = SlotKey::new(AccountId::new("a"), Pool::new(Product::Video));
    for (slots, mode) in slots.iter().zip(modes) {
        let create = tokio::time::timeout(Duration::from_secs(3), slots.acquire(pool.clone(), 1))
            .await
            .unwrap_or_else(|_| panic!("{mode:?}: the create still waits after 3 s"));
        let error = create.expect_err("refused");
        assert!(
            error.to_string().contains("refused authentication"),
            "{mode:?}: {error}"
        );
    }

    require_password(&mut admin, "old-pw").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Err(error) = gcras[1].acquire(&key, &policy).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the password accepted again, decisions still fail: {error} ({:?})",
            error.store_error().to_string()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A give-back made while the server refuses the password fails loudly in `Wait` mode too (no
/// silent `Ok`), yet is kept, as during an outage, and replayed once the server accepts the
/// password again: the fleet does not hold the slot until its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_server_refused_is_kept_and_replayed_once_it_accepts_the_password() {
    let Some(server) = redis() else { return };
    require_password(&mut raw(&server).await, "old-pw").await;
    let conn = Connection::connect(config(url(&server, Some("old-pw"))))
        .await
        .unwrap();
    let slots = RedisSlots::new(conn, SlotsConfig::new(5))
        .unwrap()
        .maintain_every(Duration::from_secs(3600));
    let key = SlotKey::new(AccountId::new("a"), Pool::new(Product::Video));
    let granted = slots.acquire(key.clone(), 1).await.unwrap();

    let mut admin = change_password(&server).await;
    // The connection's drop is noticed first (an unreachable moment), then the refusal.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !slots.maintain().await.is_err_and(|e| e.is_auth_refused()) {
        assert!(tokio::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = slots
        .apply(kling_concurrency::backend::SlotOp::GiveBack(granted))
        .await
        .expect_err("a refused change fails loudly");
    assert!(
        error.to_string().contains("refused authentication"),
        "{error}"
    );
    // A replay while the server still refuses the password keeps the change queued.
    let replayed = slots.maintain().await;
    assert!(replayed.is_err_and(|e| e.is_auth_refused()));

    require_password(&mut admin, "old-pw").await;
    let other = RedisSlots::new(
        Connection::connect(config(url(&server, Some("old-pw"))))
            .await
            .unwrap(),
        SlotsConfig::new(5),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let _ = slots.maintain().await;
        let snapshot = other.snapshot().await.unwrap();
        let in_use = snapshot
            .iter()
            .find(|p| p.key == key)
            .map_or(0, |p| p.in_use);
        if in_use == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the give-back was not replayed: {in_use} in use"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pause (1302, `Retry-After`) reported while the server refuses the password fails loudly,
/// yet holds in this process and is kept, as during an outage, and delivered once the server
/// accepts the password again: the rest of the fleet learns of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_the_server_refused_is_delivered_once_it_accepts_the_password() {
    let Some(server) = redis() else { return };
    require_password(&mut raw(&server).await, "old-pw").await;
    let gcra = RedisGcra::new(
        Connection::connect(config(url(&server, Some("old-pw"))))
            .await
            .unwrap(),
    )
    .retry_every(Duration::from_millis(50));
    let key = BucketKey::account(Some(AccountId::new("a")));
    let policy = Policy::new(Quota::per_second(1000.0), Cooldown::default());
    assert_eq!(gcra.acquire(&key, &policy).await.unwrap(), Decision::Admit);

    let mut admin = change_password(&server).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while gcra.acquire(&key, &policy).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = tokio::time::Instant::now();
    let pause = Feedback::Pause {
        sent_at: now,
        received_at: now,
        resume_at: Some(now + Duration::from_secs(60)),
        throttled: true,
    };
    let error = gcra.feedback(&key, &policy, pause).await.unwrap_err();
    assert!(
        error
            .store_error()
            .to_string()
            .contains("refused authentication"),
        "{error}"
    );
    // Its deliveries, every 50 ms, are refused a few times meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;

    require_password(&mut admin, "old-pw").await;
    let other = RedisGcra::new(
        Connection::connect(config(url(&server, Some("old-pw"))))
            .await
            .unwrap(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        match other.acquire(&key, &policy).await.unwrap() {
            Decision::NotBefore { cooldown: true, .. } => break,
            decision => assert!(
                tokio::time::Instant::now() < deadline,
                "the pause never reached redis: {decision:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
