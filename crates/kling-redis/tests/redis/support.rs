//! Fixtures: a Redis per test and connections to it.

use std::time::Duration;

use kling_redis::testing::RedisServer;
use kling_redis::{Connection, RedisConfig};

/// A fresh Redis, or `None` (after printing why) when this machine has none and `CI` is unset.
pub(crate) fn redis() -> Option<RedisServer> {
    RedisServer::start_or_skip().expect("CI=true requires a redis-server")
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

/// A TCP relay to the Redis on `port` that holds each chunk for `delay` before passing it on,
/// both ways: a process farther from Redis than the others. Returns the relay's port.
async fn far_relay(port: u16, delay: Duration) -> u16 {
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

/// Two processes of one fleet on a fresh Redis, made by `process` from a connection: one
/// near Redis, one reaching it through a relay that holds every chunk 5 ms each way. Each runs
/// `take` for 3 s; returns how many each took (near, far).
pub(crate) async fn near_and_far<B, F, Fut>(
    process: impl Fn(Connection) -> B,
    take: F,
) -> (usize, usize)
where
    F: Fn(B, tokio::time::Instant) -> Fut,
    Fut: std::future::Future<Output = usize> + Send + 'static,
{
    let server = redis().expect("checked by the caller");
    let relay = far_relay(server.port(), Duration::from_millis(5)).await;
    let near = process(connect(&server).await);
    let far = process(connect_port(relay).await);
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let (near, far) = tokio::join!(
        tokio::spawn(take(near, until)),
        tokio::spawn(take(far, until))
    );
    (near.unwrap(), far.unwrap())
}
