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
