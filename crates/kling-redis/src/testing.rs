//! A throw-away `redis-server` for tests (feature `testing`): a free loopback port, no
//! persistence unless asked ([`RedisServer::save`], then
//! [`restart_from_snapshot`](RedisServer::restart_from_snapshot)), answering `PING` before it
//! is handed out, killed on drop.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use kling_redis::testing::RedisServer;
//!
//! // `None` means "no redis-server here and not on CI": the test may skip, saying why.
//! let Some(server) = RedisServer::start_or_skip()? else { return Ok(()) };
//! let url = server.url(); // redis://127.0.0.1:PORT/
//! # let _ = url;
//! # Ok(())
//! # }
//! ```
//!
//! Under `CI=true` a server that cannot be started is an error, never a skip. The binary is
//! `redis-server` on the `PATH`, or the one `KLING_REDIS_SERVER` names (Debian package
//! `redis-server`; `.ci/run` installs it when missing).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How many entries `PREFIX:ended` keeps at most (the README's "When Redis restarts or goes
/// away"), the first to expire forgotten first; `PREFIX:done` keeps as many ids.
pub const ENDED_KEPT: usize = crate::slots_lua::ENDED_KEPT;

/// How long a fresh server may take to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process on a loopback port, killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    binary: String,
    /// Its working directory, where [`save`](RedisServer::save) writes `dump.rdb`.
    dir: PathBuf,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("running", &self.child.is_some())
            .finish()
    }
}

/// Whether tests run on CI, where a missing Redis is a failure.
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers `PING`.
    pub fn start() -> io::Result<RedisServer> {
        let port = free_port()?;
        let binary =
            std::env::var("KLING_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let dir =
            std::env::temp_dir().join(format!("kling-redis-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        remove_snapshot(&dir)?;
        let mut server = RedisServer {
            child: None,
            port,
            binary,
            dir,
        };
        server.spawn()?;
        Ok(server)
    }

    /// [`RedisServer::start`], except that outside CI a machine without `redis-server` gives
    /// `Ok(None)` after printing why (the caller skips); under `CI=true` it is an error.
    pub fn start_or_skip() -> io::Result<Option<RedisServer>> {
        match RedisServer::start() {
            Ok(server) => Ok(Some(server)),
            Err(error) if !on_ci() => {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("skipping: cannot start redis-server ({error}); on CI this fails");
                }
                Ok(None)
            }
            Err(error) => Err(io::Error::new(
                error.kind(),
                format!("CI=true and redis-server cannot be started: {error}"),
            )),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (its state is lost: no persistence); [`restart`](Self::restart)
    /// brings a fresh one up on the same port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts a fresh, empty server on the same port (after [`stop`](Self::stop)).
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        remove_snapshot(&self.dir)?;
        self.spawn()
    }

    /// Writes the server's state to its snapshot (`SAVE`), which
    /// [`restart_from_snapshot`](Self::restart_from_snapshot) loads.
    pub fn save(&self) -> io::Result<()> {
        let timeouts = (Duration::from_millis(500), Duration::from_secs(5));
        inline_command(self.port, "SAVE", b"+OK\r\n", timeouts)
    }

    /// Kills the server and starts a new one on the same port that loads the last
    /// [`save`](Self::save): a restart with persistence, whose state is older than the one
    /// it lost (what an RDB or AOF restart, or a failover to a lagging replica, brings back).
    pub fn restart_from_snapshot(&mut self) -> io::Result<()> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> io::Result<()> {
        let child = Command::new(&self.binary)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dbfilename",
                "dump.rdb",
                "--dir",
            ])
            .arg(&self.dir)
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.binary)))?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if ping(self.port).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "redis-server exited at start ({status})"
                )));
            }
            if started.elapsed() > START_TIMEOUT {
                self.stop();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "redis-server did not answer PING",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Makes `conn` (and its clones) read a system clock `ahead_us` microseconds ahead of the real
/// one (negative: behind): a process whose clock is off, whose decisions must still follow the
/// Redis server's `TIME`. Set it before the connection's first command.
pub fn skew_local_clock(conn: &crate::Connection, ahead_us: i64) {
    conn.skew_local_clock(ahead_us);
}

/// Makes the next `probes` clock probes of `conn` (and its clones) read their answer `by` late:
/// a process descheduled right after Redis answered `TIME`, which takes the server's clock for
/// `by / 2` behind where it is.
pub fn stall_clock_probes(conn: &crate::Connection, probes: u32, by: Duration) {
    conn.stall_clock_probes(probes, by);
}

/// Moves the fleet time of `conn` (and its clones) `ahead_us` microseconds (negative: back),
/// as a new measurement of the server's clock does: by up to half a slow probe's round trip
/// (see [`stall_clock_probes`]), or by the servers' difference after a failover to one whose
/// clock is off. Call it after the connection's first measurement; the next one undoes it.
pub fn shift_fleet_clock(conn: &crate::Connection, ahead_us: i64) {
    conn.shift_fleet_clock(ahead_us);
}

/// Makes `slots` (and its clones) wait `by` before sending each change it replays: a replay
/// whose changes are in flight while the process makes new ones.
pub fn delay_replay(slots: &crate::RedisSlots, by: Duration) {
    slots.delay_replay(by);
}

/// Makes the background maintenance task of `slots` (and its clones) skip its passes while
/// `held`, whatever wakes it (a subscription made, Redis answering again): a test that pauses
/// Redis and checks what was kept for replay is not raced by a pass that replays it at that
/// moment; it runs [`RedisSlots::maintain`](crate::RedisSlots::maintain) itself.
pub fn hold_maintenance(slots: &crate::RedisSlots, held: bool) {
    slots.hold_maintenance(held);
}

/// Makes `slots` (and its clones) drop the answers of its next `answers` acquire asks after
/// Redis ran them, as a command timeout does: an ask that may have been granted, whose
/// process asks again.
pub fn lose_acquire_answers(slots: &crate::RedisSlots, answers: u32) {
    slots.lose_acquire_answers(answers);
}

/// Makes `slots` (and its clones) ignore the halts other processes broadcast on
/// `PREFIX:halted` and skip reading the halts after it subscribes, while `miss` holds: a
/// process that learns of another's halt only at its next ask of the account, as before the
/// broadcast (the control of the tests that show it).
pub fn miss_halt_broadcasts(slots: &crate::RedisSlots, miss: bool) {
    slots.miss_halt_broadcasts(miss);
}

/// A port nobody listens on now (bound once by the OS and released).
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(listener.local_addr()?.port())
}

fn ping(port: u16) -> io::Result<()> {
    let timeouts = (Duration::from_millis(200), Duration::from_millis(500));
    inline_command(port, "PING", b"+PONG\r\n", timeouts)
}

/// Sends the server on `port` one inline `command` and checks that it answers exactly
/// `reply`, with `(connect, read)` timeouts.
fn inline_command(
    port: u16,
    command: &str,
    reply: &[u8],
    (connect, read): (Duration, Duration),
) -> io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, connect)?;
    stream.set_read_timeout(Some(read))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut buf = vec![0; reply.len()];
    stream.read_exact(&mut buf)?;
    if buf == reply {
        Ok(())
    } else {
        Err(io::Error::other(format!("unexpected answer to {command}")))
    }
}

/// Removes the server's snapshot in `dir`, if there is one: the next server starts empty.
fn remove_snapshot(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(dir.join("dump.rdb")) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Which connections [`kill_clients`] drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Clients {
    /// Commands' connections (`CLIENT KILL TYPE normal`), but the one sending it.
    Normal,
    /// Subscriptions (`CLIENT KILL TYPE pubsub`): the task slots' wake-up connections.
    PubSub,
}

/// Has the server close the connections `which` over `admin` (which stays open), as a
/// password change, a proxy or an idle `timeout` does: the next connections must be made
/// anew. Returns how many were closed.
pub async fn kill_clients(
    admin: &mut redis::aio::MultiplexedConnection,
    which: Clients,
) -> redis::RedisResult<i64> {
    let kind = match which {
        Clients::Normal => "normal",
        Clients::PubSub => "pubsub",
    };
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg(kind)
        .arg("SKIPME")
        .arg("yes")
        .query_async(admin)
        .await
}
