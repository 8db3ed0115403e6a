//! A Redis that refuses the configured credentials (a wrong password, none given to a server
//! that requires one, a password changed on the server): a configuration error, said so at
//! connect and at run time, never taken for an unreachable Redis. And the credentials in the
//! `url` are never shown.

use std::time::Duration;

use kling_concurrency::SlotsConfig;
use kling_concurrency::backend::{SlotBackend, SlotKey};
use kling_core::{AccountId, Pool, Product};
use kling_ratelimit::backend::Feedback;
use kling_ratelimit::error::BackendErrorKind;
use kling_ratelimit::{Backend, BucketKey, Cooldown, Decision, Policy, Quota};
use kling_redis::error::StoreErrorKind;
use kling_redis::testing::{Clients, RedisServer, kill_clients};
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
    kill_clients(&mut admin, Clients::Normal).await.unwrap();
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
            BackendErrorKind::AuthRefused,
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

/// A give-back the server refused is replayed as soon as the server accepts the password
/// again, as after an outage, not at the next maintenance pass (an hour here; by default a
/// second, during which the pool's last slot stays taken and creates wait or are refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_server_refused_is_replayed_as_soon_as_it_accepts_the_password() {
    let Some(server) = redis() else { return };
    require_password(&mut raw(&server).await, "old-pw").await;
    let conn = Connection::connect(config(url(&server, Some("old-pw"))))
        .await
        .unwrap();
    let slots = RedisSlots::new(conn.clone(), SlotsConfig::new(1))
        .unwrap()
        .maintain_every(Duration::from_secs(3600));
    let key = SlotKey::new(AccountId::new("a"), Pool::new(Product::Video));
    let granted = slots.acquire(key.clone(), 1).await.unwrap();

    let mut admin = change_password(&server).await;
    // The dropped connection is noticed by another user of it: the task slots see only the
    // refusal, no outage.
    let gcra = RedisGcra::new(conn).when_unreachable(WhenUnreachable::Fail);
    let gkey = BucketKey::account(Some(AccountId::new("a")));
    let policy = Policy::new(Quota::per_second(1000.0), Cooldown::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !gcra.acquire(&gkey, &policy).await.is_err_and(|e| {
        e.store_error()
            .to_string()
            .contains("refused authentication")
    }) {
        assert!(tokio::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = slots
        .apply(kling_concurrency::backend::SlotOp::GiveBack(granted))
        .await
        .expect_err("refused");
    assert!(
        error.to_string().contains("refused authentication"),
        "{error}"
    );
    assert!(!slots.is_out(), "the task slots saw no outage");

    require_password(&mut admin, "old-pw").await;
    // The next create finds the server accepting the password: the give-back is replayed,
    // and frees the pool's one slot for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let granted = loop {
        match tokio::time::timeout(Duration::from_secs(3), slots.acquire(key.clone(), 1)).await {
            Ok(Ok(granted)) => break granted,
            Ok(Err(error)) if tokio::time::Instant::now() < deadline => {
                // Refused until the connection backing off after the refusals connects again.
                assert!(error.to_string().contains("refused"), "{error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!(
                "the give-back waits for the next maintenance pass: {:?} ({} pending)",
                other.map(|r| r.map(|_| ())),
                slots.pending()
            ),
        }
    };
    drop(granted);
}

/// After an outage, a server that answers but refuses the password is not logged as Redis
/// reachable again with the rate limiter or task slots "shared again": every decision and
/// create fails until the password is accepted. The log says it refuses the credentials.
#[tokio::test]
async fn a_refusal_after_an_outage_is_not_logged_as_redis_reachable_again() {
    let Some(mut server) = redis() else { return };
    let (logs, _capture) = crate::support::capture_logs();
    require_password(&mut raw(&server).await, "old-pw").await;
    let conn = Connection::connect(config(url(&server, Some("old-pw"))))
        .await
        .unwrap();
    let gcra = RedisGcra::new(conn.clone()).when_unreachable(WhenUnreachable::Fail);
    let slots = RedisSlots::new(conn, SlotsConfig::new(5))
        .unwrap()
        .maintain_every(Duration::from_secs(3600))
        .when_unreachable(WhenUnreachable::Fail);
    let key = BucketKey::account(Some(AccountId::new("a")));
    let policy = Policy::new(Quota::per_second(1000.0), Cooldown::default());
    let pool = SlotKey::new(AccountId::new("a"), Pool::new(Product::Video));
    gcra.acquire(&key, &policy).await.unwrap();
    drop(slots.acquire(pool.clone(), 1).await.unwrap());

    server.stop();
    let error = gcra.acquire(&key, &policy).await.unwrap_err();
    assert_eq!(error.kind(), BackendErrorKind::Unreachable, "{error}");
    assert!(gcra.is_out());
    let error = slots.acquire(pool.clone(), 1).await.unwrap_err();
    assert!(slots.is_out(), "{error}");

    server.restart().unwrap();
    // A fresh server, with another password (a connection made before it is set, refused
    // as the server had none, is dropped).
    let mut admin = raw(&server).await;
    require_password(&mut admin, "new-pw").await;
    kill_clients(&mut admin, Clients::Normal).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let gcra_refused = gcra.acquire(&key, &policy).await.is_err_and(|e| {
            e.store_error()
                .to_string()
                .contains("refused authentication")
        });
        let slots_refused = slots
            .acquire(pool.clone(), 1)
            .await
            .is_err_and(|e| e.to_string().contains("refused authentication"));
        if gcra_refused && slots_refused {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refused: {:?} {:?}",
            gcra.acquire(&key, &policy).await,
            slots.acquire(pool.clone(), 1).await.map(|_| ())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = logs.lock().unwrap();
    assert!(
        !logs.iter().any(|line| line.contains("shared again")),
        "{logs:#?}"
    );
    for backend in ["rate limiter", "task slots"] {
        assert!(
            logs.iter()
                .any(|line| line.contains("refuses the credentials") && line.contains(backend)),
            "{backend}: {logs:#?}"
        );
    }
    assert!(!gcra.is_out() && !slots.is_out(), "reachable");
}

/// The server's `total_connections_received`, and how many listen on `test:freed`.
async fn connections_and_listeners(admin: &mut redis::aio::MultiplexedConnection) -> (u64, i64) {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(admin)
        .await
        .unwrap();
    let connections = info
        .lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (_, listening): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("test:freed")
        .query_async(admin)
        .await
        .unwrap();
    (connections, listening)
}

/// The task slots' wake-up (pub/sub) connection dropped after the password changed on the
/// server (the commands' connection, authenticated before, still answered): it connects again
/// about once a second, not in a storm, says once that the password is refused (wake-ups
/// stop, creates poll meanwhile) instead of nothing, and subscribes again once the server
/// accepts it.
#[tokio::test]
async fn the_wake_up_connection_refused_the_password_retries_slowly_says_so_and_resumes() {
    let Some(server) = redis() else { return };
    let (logs, _capture) = crate::support::capture_logs();
    require_password(&mut raw(&server).await, "old-pw").await;
    let conn = Connection::connect(config(url(&server, Some("old-pw"))))
        .await
        .unwrap();
    let slots = RedisSlots::new(conn, SlotsConfig::new(5))
        .unwrap()
        .maintain_every(Duration::from_secs(3600));
    let key = SlotKey::new(AccountId::new("a"), Pool::new(Product::Video));
    drop(slots.acquire(key.clone(), 1).await.unwrap());
    let mut admin = redis::Client::open(url(&server, Some("old-pw")))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while connections_and_listeners(&mut admin).await.1 < 1 {
        assert!(tokio::time::Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    require_password(&mut admin, "new-pw").await;
    kill_clients(&mut admin, Clients::PubSub).await.unwrap();
    let (before, _) = connections_and_listeners(&mut admin).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (after, listening) = connections_and_listeners(&mut admin).await;
    assert_eq!(listening, 0);
    assert!(after - before <= 8, "{} connections in 3 s", after - before);
    assert!(
        after - before >= 2,
        "stopped connecting ({})",
        after - before
    );
    let refusals = logs
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("wake-up connection") && line.contains("refused"))
        .count();
    assert_eq!(refusals, 1, "{:#?}", logs.lock().unwrap());

    require_password(&mut admin, "old-pw").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while connections_and_listeners(&mut admin).await.1 < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never subscribed again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The commands' connection was never refused: the slots still work.
    drop(slots.acquire(key, 1).await.unwrap());
}

/// `RedisConfig`'s `Debug` never shows what the `redis` crate reads from the `url` as a user
/// or a password: a Unix socket URL's `user` and `pass` query parameters, with one slash
/// after the scheme or three, a percent-encoded parameter name (the `redis` crate decodes it),
/// one with a tab in it (the `url` crate drops tabs), and a password in the userinfo. What is
/// no secret is still shown.
#[test]
fn debug_never_shows_a_password_the_redis_crate_reads() {
    let mut leaks = Vec::new();
    for url in [
        "unix:/run/redis.sock?pass=hunter2",
        "unix:/run/redis.sock?user=admin&pass=hunter2",
        "redis+unix:/run/redis.sock?db=1&pass=hunter2",
        "redis+unix:///run/redis.sock?p%61ss=hunter2",
        "redis+unix:///run/redis.sock?%75ser=admin&pass=hunt%65r2",
        "unix:///run/redis.sock?pa\tss=hunter2&us\ner=admin",
        "redis+unix:///run/redis.sock?pass=other&pass=hunter2",
        "redis://admin:hunter2@10.0.0.5:6379/0",
        "redis://:hunt%65r2@10.0.0.5/",
    ] {
        let client = redis::Client::open(url).expect("the redis crate accepts it");
        let settings = client.get_connection_info().redis_settings();
        assert_eq!(settings.password(), Some("hunter2"), "{url}");
        assert!(RedisConfig::new(url).validate().is_ok(), "{url}");
        let shown = format!("{:?}", RedisConfig::new(url));
        if ["hunt", "admin"]
            .iter()
            .any(|secret| shown.contains(secret))
        {
            leaks.push((url, shown));
        }
    }
    assert!(leaks.is_empty(), "{leaks:#?}");
    for (url, shown) in [
        (
            "redis+unix:/run/redis.sock?db=1&pass=hunter2",
            "redis+unix:/run/redis.sock?db=1&pass=***",
        ),
        (
            "redis+unix:///run/redis.sock?p%61ss=hunter2&protocol=3",
            "redis+unix:///run/redis.sock?p%61ss=***&protocol=3",
        ),
        (
            "redis://admin:hunter2@10.0.0.5:6379/0?protocol=3",
            "redis://***@10.0.0.5:6379/0?protocol=3",
        ),
        ("redis://10.0.0.5:6379/2", "redis://10.0.0.5:6379/2"),
    ] {
        let debug = format!("{:?}", RedisConfig::new(url));
        assert!(
            debug.contains(&format!("url: \"{shown}\"")),
            "{url}: {debug}"
        );
    }
}
