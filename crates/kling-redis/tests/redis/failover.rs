//! A failover that moves the endpoint to another server: the process follows it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use kling_core::AccountId;
use kling_ratelimit::{Backend, BucketKey, Cooldown, Decision, Policy, Quota};
use kling_redis::RedisGcra;

use crate::support::{connect_with_timeout, raw, redis};

/// A TCP relay to the Redis whose port `target` holds when a connection is made: a name or
/// address a failover moves to the new primary. Connections made before a move stay with the
/// server they reached. Returns the relay's port, and the count of connections made.
async fn moving_endpoint(target: Arc<AtomicU16>) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let port = target.load(Ordering::SeqCst);
            let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (relay, connections)
}

/// A process on `endpoint` whose commands give up after 500 ms, asking an unreachable Redis
/// again every 50 ms.
async fn process(endpoint: u16) -> RedisGcra {
    let conn = connect_with_timeout(
        format!("redis://127.0.0.1:{endpoint}/"),
        Duration::from_millis(500),
    )
    .await;
    RedisGcra::new(conn).retry_every(Duration::from_millis(50))
}

fn key_and_policy() -> (BucketKey, Policy) {
    (
        BucketKey::account(Some(AccountId::new("failover"))),
        Policy::new(Quota::per_second(50.0), Cooldown::default()),
    )
}

/// Makes `server` a replica of the Redis on `primary`: it answers every write `READONLY`.
async fn demote(server: &kling_redis::testing::RedisServer, primary: u16) {
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(primary)
        .query_async(&mut raw(server).await)
        .await
        .unwrap();
}

/// A failover that demotes the primary (its endpoint moves to the new primary, the old one
/// becomes its replica and answers every write with `READONLY`) is followed within a second or
/// so: the process connects again, through the endpoint, to the new primary. Before, its one
/// connection stayed with the demoted server, and every decision was refused as "Redis away"
/// for as long as that connection lived: in `Wait` mode, requests waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_that_demotes_the_primary_decisions_reach_the_new_one() {
    let Some(old) = redis() else { return };
    let Some(new) = redis() else { return };
    let target = Arc::new(AtomicU16::new(old.port()));
    let (endpoint, _) = moving_endpoint(Arc::clone(&target)).await;
    let gcra = process(endpoint).await;
    let (key, policy) = key_and_policy();
    assert_eq!(gcra.acquire(&key, &policy).await.unwrap(), Decision::Admit);

    target.store(new.port(), Ordering::SeqCst);
    demote(&old, new.port()).await;

    let start = tokio::time::Instant::now();
    let mut refused = 0;
    loop {
        match gcra.acquire(&key, &policy).await.unwrap() {
            Decision::Admit => break,
            Decision::NotBefore { at, .. } => {
                refused += 1;
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "still refused after {:?} ({refused} asks): the process stays with the \
                     demoted primary",
                    start.elapsed()
                );
                tokio::time::sleep_until(at).await;
            }
            other => panic!("{other:?}"),
        }
    }
    let decided_by_new: bool = redis::cmd("EXISTS")
        .arg(gcra.key_of(&key))
        .query_async(&mut raw(&new).await)
        .await
        .unwrap();
    assert!(
        decided_by_new,
        "the admission was not decided by the new primary"
    );
}

/// While the endpoint still leads to the demoted server (the failover has not moved it yet),
/// the process connects again at most about once a second, not at every command: 2 s of
/// asks every 50 ms make at most 4 connections (the first included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_whose_endpoint_stays_read_only_connects_again_at_most_once_a_second() {
    let Some(old) = redis() else { return };
    let Some(new) = redis() else { return };
    let (endpoint, connections) = moving_endpoint(Arc::new(AtomicU16::new(old.port()))).await;
    let gcra = process(endpoint).await;
    let (key, policy) = key_and_policy();
    assert_eq!(gcra.acquire(&key, &policy).await.unwrap(), Decision::Admit);
    demote(&old, new.port()).await;

    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut refused = 0;
    while tokio::time::Instant::now() < until {
        match gcra.acquire(&key, &policy).await.unwrap() {
            Decision::NotBefore { at, .. } => {
                refused += 1;
                tokio::time::sleep_until(at).await;
            }
            other => panic!("a replica admitted: {other:?}"),
        }
    }
    let made = connections.load(Ordering::SeqCst);
    assert!(refused >= 20, "{refused} asks");
    assert!(made >= 2, "never connected again ({made} connections)");
    assert!(made <= 4, "{made} connections for {refused} asks");
}

/// While Redis refuses connections (down, or at its `maxclients`: here an address that
/// accepts and closes each one), a process connects again a few times a second, not once for
/// every command: 2 s of requests in `Fail` mode, one every 5 ms, make at most 30 connection
/// attempts (before, about 250: the `redis` crate's connection manager connects again for every
/// command that finds its last attempt failed). Once Redis is back, the process reaches it
/// within a second or so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_refuses_connections_a_process_connects_again_a_few_times_a_second() {
    let Some(server) = redis() else { return };
    // Port 0: the relay cannot reach a server, and closes each connection it accepted.
    let target = Arc::new(AtomicU16::new(0));
    let (endpoint, connections) = moving_endpoint(Arc::clone(&target)).await;
    let conn = kling_redis::Connection::lazy(
        kling_redis::RedisConfig::new(format!("redis://127.0.0.1:{endpoint}/"))
            .prefix("test")
            .command_timeout(Duration::from_millis(500)),
    )
    .unwrap();
    let gcra = RedisGcra::new(conn).when_unreachable(kling_redis::WhenUnreachable::Fail);
    let (key, policy) = key_and_policy();

    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut failed = 0;
    while tokio::time::Instant::now() < until {
        assert!(gcra.acquire(&key, &policy).await.is_err(), "admitted");
        failed += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let made = connections.load(Ordering::SeqCst);
    #[allow(clippy::print_stderr)]
    {
        eprintln!("{made} connection attempts for {failed} requests");
    }
    assert!(failed >= 100, "{failed} requests");
    assert!(
        made <= 30,
        "{made} connection attempts for {failed} requests"
    );

    target.store(server.port(), Ordering::SeqCst);
    let back = tokio::time::Instant::now();
    while gcra.acquire(&key, &policy).await.is_err() {
        assert!(
            back.elapsed() < Duration::from_millis(1500),
            "Redis not reached again"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    #[allow(clippy::print_stderr)]
    {
        eprintln!("reached again after {:?}", back.elapsed());
    }
}
