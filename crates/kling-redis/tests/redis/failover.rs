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

/// A task's hold and its end (a list page's report, whose end notes nothing when it finds no
/// holding) both on the connection when the server answers them `READONLY` are kept, and
/// replayed in the order they were made, whichever failed answer its task saw first: the end
/// replayed before the hold would find no task, and the hold would then keep the slot held
/// until its lease ran out (an hour here). Without the order kept, 1 to 5 rounds in 20 failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_and_its_end_refused_together_are_replayed_in_the_order_they_were_made() {
    use kling_concurrency::SlotsConfig;
    use kling_concurrency::backend::{SlotBackend, SlotKey, SlotOp, TaskRef, TaskUpdate};
    use kling_core::{Pool, Product, TaskStatus};

    let Some(server) = redis() else { return };
    let slots = kling_redis::RedisSlots::new(
        connect_with_timeout(server.url(), Duration::from_secs(2)).await,
        SlotsConfig::new(5),
    )
    .unwrap()
    .maintain_every(Duration::from_secs(3600));
    let lease = Duration::from_secs(3600);
    let mut held_to_lease = Vec::new();
    for round in 0..40 {
        let account = AccountId::new(format!("a{round}"));
        let key = SlotKey::new(account.clone(), Pool::new(Product::Video));
        let granted = slots.acquire(key.clone(), 1).await.unwrap();
        // Nothing listens on port 1: the server stays a replica with its data.
        demote(&server, 1).await;
        let id = format!("t{round}");
        let hold = slots.apply(SlotOp::Hold {
            reservation: granted,
            task: TaskRef {
                id: Some(id.clone()),
                external_id: None,
            },
            lease,
        });
        let end = slots.apply(SlotOp::Update {
            account: account.clone(),
            updates: vec![
                TaskUpdate {
                    id,
                    external_id: None,
                    status: Some(TaskStatus::Succeeded),
                },
                TaskUpdate {
                    id: "another".to_owned(),
                    external_id: None,
                    status: Some(TaskStatus::Processing),
                },
            ],
            lease,
        });
        let _ = tokio::join!(hold, end);
        let _: () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query_async(&mut raw(&server).await)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while slots.maintain().await.is_err() || slots.pending() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "never replayed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let snapshot = slots.snapshot().await.unwrap();
        if snapshot.iter().any(|p| p.key == key && p.in_use > 0) {
            held_to_lease.push(round);
        }
    }
    assert!(
        held_to_lease.is_empty(),
        "rounds whose slot stays held to its lease: {held_to_lease:?}"
    );
}
