//! Fixtures: a Redis per test and connections to it.

use std::time::Duration;

use kling_redis::testing::RedisServer;
use kling_redis::{Connection, RedisConfig};

/// A fresh Redis, or `None` (after printing why) when this machine has none and `CI` is unset.
pub(crate) fn redis() -> Option<RedisServer> {
    RedisServer::start_or_skip().expect("CI=true requires a redis-server")
}

/// A plain connection to `server`, to read what the scripts left, and to wait out a
/// `CLIENT PAUSE` (a `PING` answers when it ends). Patient: the client's default 500 ms
/// response timeout left a loaded machine about 100 ms of margin behind a 600 ms pause, and a
/// test failed there on its own `PING`.
pub(crate) async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let patient = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&patient)
        .await
        .unwrap()
}

/// The milliseconds `key` has left (-1: no expiry, -2: no key).
pub(crate) async fn pttl(server: &RedisServer, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut raw(server).await)
        .await
        .unwrap()
}

/// A new connection (its own socket) to `server`.
pub(crate) async fn connect(server: &RedisServer) -> Connection {
    Connection::connect(
        RedisConfig::new(server.url())
            .prefix("test")
            .command_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("redis answers")
}

/// A connection to the Redis at `url` (a server's, or a relay's) whose commands give up after
/// `timeout`.
pub(crate) async fn connect_with_timeout(url: impl Into<String>, timeout: Duration) -> Connection {
    Connection::connect(
        RedisConfig::new(url)
            .prefix("test")
            .command_timeout(timeout),
    )
    .await
    .expect("redis answers")
}

/// Stops `server` answering every client for `ms` milliseconds (`CLIENT PAUSE ms ALL`):
/// commands sent meanwhile wait, and run when the pause ends, in the order they came.
pub(crate) async fn client_pause(server: &RedisServer, ms: u64) {
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("ALL")
        .query_async(&mut raw(server).await)
        .await
        .unwrap();
}

/// Waits until `processes` subscribers listen on the `channel` of the `test` prefix (each
/// `RedisSlots` subscribes on first use, and wakes its waiting creates when it has).
pub(crate) async fn subscribed(server: &RedisServer, channel: &str, processes: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, listening): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("test:{channel}"))
            .query_async(&mut raw(server).await)
            .await
            .unwrap();
        if listening >= processes {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "not subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP relay to the Redis on `port` that holds each chunk for `delay` before passing it on,
/// both ways: a process farther from Redis than the others. Returns the relay's port.
pub(crate) async fn far_relay(port: u16, delay: Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        delay: Duration,
    ) {
        let mut buf = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            tokio::time::sleep(delay).await;
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pipe(client_read, server_write, delay));
            tokio::spawn(pipe(server_read, client_write, delay));
        }
    });
    relay
}

/// A TCP relay to the Redis on `port` whose answers wait while its gate is shut (`false`):
/// commands reach Redis and run, their replies are held back. Returns the relay's port and
/// the gate, open.
pub(crate) async fn gated_relay(port: u16) -> (u16, tokio::sync::watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gate, open) = tokio::sync::watch::channel(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let mut buf = vec![0; 16 * 1024];
                while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            let mut open = open.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 16 * 1024];
                while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                    if open.wait_for(|open| *open).await.is_err()
                        || client_write.write_all(&buf[..n]).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (relay, gate)
}

/// A new connection to a Redis (or relay) on a loopback `port`.
async fn connect_port(port: u16) -> Connection {
    Connection::connect(
        RedisConfig::new(format!("redis://127.0.0.1:{port}/"))
            .prefix("test")
            .command_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("redis answers")
}

/// Two processes of one fleet on a fresh Redis, made by `process` from a connection and the
/// fleet-order choice: one near Redis, one reaching it through a relay that holds every chunk
/// 20 ms each way (far enough that a wakeup a busy 2-core machine delays by a few ms does not
/// hand the far process the races the control says it loses). Each runs `take` (which counts what it got) for 3 s. In arrival order the far
/// process must get more than a third; the control, first to ask wins, must starve it (under
/// 15%: the near process wins every race).
pub(crate) async fn far_process_gets_its_turn<B, F, Fut>(
    what: &str,
    process: impl Fn(Connection, bool) -> B,
    take: F,
) where
    F: Fn(B, tokio::time::Instant) -> Fut,
    Fut: std::future::Future<Output = usize> + Send + 'static,
{
    for arrival_order in [true, false] {
        let server = redis().expect("checked by the caller");
        let relay = far_relay(server.port(), Duration::from_millis(20)).await;
        let near = process(connect(&server).await, arrival_order);
        let far = process(connect_port(relay).await, arrival_order);
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        let (near, far) = tokio::join!(
            tokio::spawn(take(near, until)),
            tokio::spawn(take(far, until))
        );
        let (near, far) = (near.unwrap(), far.unwrap());
        #[allow(clippy::print_stderr)]
        {
            eprintln!("arrival order {arrival_order}: near {near} {what}, far {far}");
        }
        let share = far as f64 / (near + far) as f64;
        if arrival_order {
            assert!(
                share > 0.35,
                "far share {share:.2} ({near} near, {far} far)"
            );
        } else {
            assert!(share < 0.15, "far share without the order {share:.2}");
        }
    }
}

/// The events logged on this thread while the guard lives, one line each (`field=value`
/// pairs): a `#[tokio::test]` runtime runs every task on its thread.
pub(crate) fn capture_logs() -> (
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tracing::subscriber::DefaultGuard,
) {
    use std::fmt::Write as _;
    use tracing::span::{Attributes, Id, Record};

    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
    struct Line(String);
    impl tracing::field::Visit for Line {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            let _ = write!(self.0, "{}={value:?} ", field.name());
        }
    }
    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let mut line = Line(String::new());
            event.record(&mut line);
            self.0.lock().unwrap().push(line.0);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
    let logs = std::sync::Arc::default();
    let guard = tracing::subscriber::set_default(Capture(std::sync::Arc::clone(&logs)));
    (logs, guard)
}
