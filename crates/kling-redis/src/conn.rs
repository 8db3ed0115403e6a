//! [`RedisConfig`] and [`Connection`]: one auto-reconnecting Redis connection, its key prefix,
//! its command timeout and the fleet's shared clock.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
#[cfg(feature = "testing")]
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script};
use tokio::time::Instant;

use crate::error::{ConfigError, StoreError};

/// The default command timeout.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "kling";

/// A clock measurement whose fastest probe took at most this long is precise enough: its
/// error is at most half of it. Past it (a loaded host: a probe's answer read late), up to
/// [`MAX_CLOCK_PROBES`] are taken, and the next measurement comes sooner.
const PRECISE_ROUND_TRIP_US: i64 = 1_000;
/// Probes per measurement when the first ones are precise.
const MIN_CLOCK_PROBES: u32 = 3;
/// Probes per measurement at most.
const MAX_CLOCK_PROBES: u32 = 10;
/// How far the monotonic clock may drift from the server's per second, µs (100 ppm, well past
/// a healthy quartz's): an older measurement's error bound grows by this, so a newer one
/// replaces it only when it is no worse.
const DRIFT_US_PER_SECOND: i64 = 100;
/// The first wait before measuring again after an imprecise measurement; it doubles each time,
/// up to `calibrate_every`.
const IMPRECISE_RETRY: Duration = Duration::from_secs(1);
/// The least time between two new connections made because the server answered `READONLY`
/// (one whose endpoint has not moved to the new primary yet reaches a replica again) or
/// refused the credentials: a connection is replaced at most this often, not at every command.
const READONLY_RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// After this many failed connections in a row, commands fail at once for a while instead of
/// each making the connection manager connect again (it does so for every command that finds
/// the last attempt failed: about a hundred connections a second per process while Redis
/// refuses them).
const FAILURES_BEFORE_BACKOFF: u32 = 2;
/// The first such while; it doubles with every failed connection after, up to
/// [`MAX_RECONNECT_BACKOFF`].
const MIN_RECONNECT_BACKOFF: Duration = Duration::from_millis(50);
/// The longest such while: a Redis that is back is reached within about twice this.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// Where Redis is and how to talk to it.
///
/// ```
/// use std::time::Duration;
/// use kling_redis::RedisConfig;
///
/// let config = RedisConfig::new("redis://127.0.0.1:6379/")
///     .prefix("kling:prod")
///     .command_timeout(Duration::from_millis(200));
/// assert!(config.validate().is_ok());
/// assert_eq!(RedisConfig::new("not a url").validate().unwrap_err().field(), "url");
/// ```
///
/// `Debug` shows the URL without anything the `redis` crate would read from it as a user or a
/// password: the userinfo is shown as `***@`, and the value of a `user` or `pass` query
/// parameter (a Unix socket URL's, its name percent-encoded or not) as `***`, with the
/// query's parameters without a value, and with either, the fragment (where a password with a
/// raw `&` or `#` left the rest of it). A URL the `redis` crate refuses, or one with an `@` past its
/// authority, has a shape that cannot be read with certainty: everything from its scheme to
/// its last `@`, and its query and fragment, are hidden.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://` where the `redis` crate has TLS).
    pub url: String,
    /// Every key starts with this and a colon (default [`DEFAULT_PREFIX`]).
    pub prefix: String,
    /// Every command fails with [`StoreError`] after this (default [`DEFAULT_COMMAND_TIMEOUT`]).
    pub command_timeout: Duration,
    /// A connection attempt fails after this (default one second).
    pub connect_timeout: Duration,
    /// How often the offset to the Redis server's clock is measured again (default 30 s).
    pub calibrate_every: Duration,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &without_userinfo(&self.url))
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("calibrate_every", &self.calibrate_every)
            .finish()
    }
}

/// `url` as [`RedisConfig`]'s `Debug` shows it: without anything the `redis` crate reads from
/// it as a user or a password, nor what may be the rest of one.
///
/// A URL the `redis` crate accepts is shown as it parses it (with the `url` crate, which drops
/// tabs and newlines and percent-decodes query names): the user and password replaced by
/// `***@`, and the value of every query parameter whose decoded name is `user` or `pass`
/// (where a Unix socket URL carries them, also as `p%61ss`) by `***`, and with it the query's
/// parameters without a value; once either is hidden, the fragment too (but `#insecure`): a
/// password with a raw `&` or `#` left the rest of it there. Any other URL's shape cannot be read
/// with certainty ([`unread`]): one the `redis` crate refuses (a raw `/`, `?` or `#` in a
/// password makes it invalid: just when a user prints the configuration to see what is
/// wrong), or one with an `@` past its authority (`redis://user:12#ab@host` is host `user`,
/// port 12: a password cut short).
fn without_userinfo(url: &str) -> Cow<'_, str> {
    let Some(mut parsed) = redis::parse_redis_url(url) else {
        return unread(url);
    };
    let past_authority = [Some(parsed.path()), parsed.query(), parsed.fragment()];
    if past_authority
        .into_iter()
        .flatten()
        .any(|part| part.contains('@'))
        || redis::Client::open(parsed.clone()).is_err()
    {
        return unread(url);
    }
    let mut hidden = false;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        if parsed.set_password(None).is_err() || parsed.set_username("***").is_err() {
            return unread(url);
        }
        hidden = true;
    }
    if let Some(query) = parsed.query() {
        // The names as the `redis` crate reads them (`form_urlencoded`: the non-empty
        // `&`-separated parts, each name up to its first `=`, decoded).
        let names: Vec<String> = parsed.query_pairs().map(|(name, _)| name.into()).collect();
        let parts: Vec<&str> = query.split('&').filter(|part| !part.is_empty()).collect();
        if names.len() != parts.len() {
            return unread(url);
        }
        let secret = |name: &str| name == "user" || name == "pass";
        if names.iter().any(|name| secret(name)) {
            let shown: Vec<String> = parts
                .iter()
                .zip(&names)
                .map(|(part, name)| match part.split_once('=') {
                    Some((raw, _)) if secret(name) => format!("{raw}=***"),
                    Some(_) => (*part).to_owned(),
                    None => "***".to_owned(),
                })
                .collect();
            parsed.set_query(Some(&shown.join("&")));
            hidden = true;
        }
    }
    if hidden
        && parsed
            .fragment()
            .is_some_and(|fragment| fragment != "insecure")
    {
        parsed.set_fragment(Some("***"));
    }
    if !hidden {
        return url.into();
    }
    parsed.to_string().into()
}

/// A URL whose shape cannot be read with certainty, shown with everything between its scheme
/// and its last `@` hidden (`***@`), and its query and fragment (`?***`, `#***`).
fn unread(url: &str) -> Cow<'_, str> {
    let start = url
        .find("://")
        .map(|at| at + 3)
        .or_else(|| url.find(':').map(|at| at + 1))
        .unwrap_or(0);
    let (scheme, rest) = url.split_at(start);
    let at = rest.rfind('@');
    let rest = at.map_or(rest, |at| &rest[at + 1..]);
    let query = rest.find(['?', '#']);
    if at.is_none() && query.is_none() {
        return url.into();
    }
    let mut shown = String::from(scheme);
    if at.is_some() {
        shown.push_str("***@");
    }
    match query {
        Some(query) => {
            shown.push_str(&rest[..query]);
            shown.push_str(&rest[query..=query]);
            shown.push_str("***");
        }
        None => shown.push_str(rest),
    }
    shown.into()
}

impl RedisConfig {
    /// The defaults for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            connect_timeout: Duration::from_secs(1),
            calibrate_every: Duration::from_secs(30),
        }
    }

    /// Sets [`prefix`](Self::prefix): one Redis can serve several fleets or environments.
    /// Give each fleet its own prefix even when they use different databases of one server
    /// (`redis://host/0`, `/1`): pub/sub channels are server-wide, so two fleets under one
    /// prefix would wake each other's waiters and could take each other's halts.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`command_timeout`](Self::command_timeout).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`calibrate_every`](Self::calibrate_every).
    pub fn calibrate_every(mut self, every: Duration) -> Self {
        self.calibrate_every = every;
        self
    }

    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if redis::Client::open(self.url.as_str()).is_err() {
            return Err(ConfigError::new("url", "is not a redis:// URL"));
        }
        if self.prefix.is_empty() {
            return Err(ConfigError::new("prefix", "must not be empty"));
        }
        if self.command_timeout.is_zero() {
            return Err(ConfigError::new(
                "command_timeout",
                "must be longer than zero",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::new(
                "connect_timeout",
                "must be longer than zero",
            ));
        }
        if self.calibrate_every.is_zero() {
            return Err(ConfigError::new(
                "calibrate_every",
                "must be longer than zero",
            ));
        }
        Ok(())
    }
}

/// One auto-reconnecting connection to Redis (the `redis` crate's `ConnectionManager`, which
/// multiplexes every command of the process over one socket), with the key prefix, a timeout on
/// every command, and the fleet clock. A server that answers `READONLY` (a primary a failover
/// demoted) gets the connection replaced, at most once a second, so the process follows the
/// configured address to the new primary. While connections keep failing, commands fail at
/// once for a while (50 ms, doubling up to 500 ms) rather than each connecting again.
///
/// # The fleet clock
///
/// GCRA instants and leases in Redis are integer microseconds of Unix time. Scripts never call
/// `TIME` (so they run the same on managed Redis and under any replication mode); instead each
/// process measures the offset between its own clock and the server's `TIME` — on connect and
/// every [`calibrate_every`](RedisConfig::calibrate_every) — and sends `local time + offset`.
/// A client whose clock is minutes off therefore still agrees with the fleet, to within half
/// the round trip of the measurement (well under a millisecond on a LAN). Scripts also never
/// move a key's state backwards in time. A [`lazy`](Connection::lazy) connection takes its
/// first measurement on first use, and both backends wait for it
/// ([`is_calibrated`](Connection::is_calibrated)).
///
/// # Clone
///
/// Clones share the connection, the clock offset and the state-loss flag.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    /// The connection in use, replaced by a new one when the server it reached answers
    /// `READONLY` ([`Connection::after_error`]).
    manager: std::sync::Mutex<Manager>,
    /// How a replacement is made.
    manager_config: ConnectionManagerConfig,
    /// Failed connections in a row, and until when commands fail at once
    /// ([`Connection::backing_off`]).
    reconnects: std::sync::Mutex<Reconnects>,
    /// Whether the last command that ended either way had its credentials refused: the
    /// refusal is logged once, as an error, and its end once.
    refused: AtomicBool,
    prefix: String,
    timeout: Duration,
    offset_us: AtomicI64,
    /// Fleet time at `epoch`, as the last measurement put it: fleet time is this plus the
    /// monotonic time since `epoch`, so a step of the system clock (a resumed VM, a
    /// `makestep`) does not move it.
    base_us: AtomicI64,
    /// The monotonic origin of `base_us`.
    epoch: std::time::Instant,
    calibrated: AtomicBool,
    /// Held by the one request that measures the first offset; the others wait for it and
    /// read its failure, if any (so a down Redis costs them one attempt, not one each).
    first_calibration: tokio::sync::Mutex<Option<StoreError>>,
    /// Added to the system clock: a process whose clock is off, for tests
    /// (`testing::skew_local_clock`).
    #[cfg(feature = "testing")]
    local_skew_us: AtomicI64,
    calibrate_every: Duration,
    schedule: std::sync::Mutex<Schedule>,
    /// The next this many probes have their answers read late (`testing::stall_clock_probes`).
    #[cfg(feature = "testing")]
    stalled_probes: AtomicU32,
    /// How late, µs.
    #[cfg(feature = "testing")]
    stall_us: AtomicU64,
    client: redis::Client,
}

/// The connection in use: which one it is (counted from 0), and when it replaced the one
/// before (none for the first).
struct Manager {
    connection: ConnectionManager,
    number: u64,
    replaced: Option<Instant>,
}

/// Failed connections in a row, and until when commands fail without reaching the connection
/// manager.
#[derive(Debug, Default)]
struct Reconnects {
    failures: u32,
    until: Option<Instant>,
    /// The last failure was Redis refusing the credentials: the commands failed meanwhile say
    /// so, not that Redis is unreachable.
    refused: bool,
    /// Failures counted so far, never reset: a command's failure counts only when none was
    /// counted since it started. The commands in flight on one dropped connection, or waiting
    /// for one connection attempt, all fail with it: one failed connection, not one each.
    counted: u64,
}

/// How a command ended, for [`Reconnects::note`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// Redis answered (a reply, or an error reply other than a refused authentication).
    Answered,
    /// Its connection failed (refused, reset, dropped).
    ConnectionFailed,
    /// Redis refused the credentials. Backed off like a failed connection: the connection
    /// manager connects (and authenticates) again for every command otherwise.
    AuthRefused,
    /// A timeout, or another error that says nothing either way.
    Inconclusive,
}

impl Reconnects {
    /// Notes the end of a command that started when [`counted`](Self::counted) was `since`.
    fn note(&mut self, ended: Ended, since: u64) {
        if ended == Ended::Answered {
            *self = Reconnects {
                counted: self.counted,
                ..Reconnects::default()
            };
        } else if ended != Ended::Inconclusive && since == self.counted {
            self.counted += 1;
            self.refused = ended == Ended::AuthRefused;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= FAILURES_BEFORE_BACKOFF {
                let doublings = (self.failures - FAILURES_BEFORE_BACKOFF).min(16);
                let backoff = MIN_RECONNECT_BACKOFF
                    .saturating_mul(1 << doublings)
                    .min(MAX_RECONNECT_BACKOFF);
                self.until = Some(Instant::now() + backoff);
            }
        }
    }
}

/// When the clock is measured again, and how good the measurement in use is.
#[derive(Debug, Default)]
struct Schedule {
    /// When the last measurement started (none yet, or one is due at the next read).
    last: Option<Instant>,
    /// While the measurement in use is imprecise: how long after `last` the next is due (1 s,
    /// doubling up to `calibrate_every`). None: `calibrate_every`.
    every: Option<Duration>,
    /// The measurement in use: its fastest probe's round trip (µs) and when it started. None
    /// before the first, and after Redis was away (the next is kept whatever its precision).
    kept: Option<(i64, std::time::Instant)>,
    /// Counts [`Connection::recalibrate_soon`]s: a measurement that started before one is not
    /// kept (it may have measured the server that went away).
    generation: u64,
    /// Whether a background measurement runs ([`Connection::maybe_calibrate`] starts one at a
    /// time, however long its probes take).
    running: bool,
}

impl Schedule {
    /// Claims the next background measurement if one is due (the last one is `every` old, or
    /// there was none) and none runs: at most one runs at a time, however long its probes take.
    fn claim(&mut self, calibrate_every: Duration) -> bool {
        let every = self.every.unwrap_or(calibrate_every);
        if self.running || self.last.is_some_and(|at| at.elapsed() < every) {
            return false;
        }
        self.last = Some(Instant::now());
        self.running = true;
        true
    }

    /// Sets when the next measurement is due after one that left the offset in use `precise`
    /// or not: `calibrate_every`, or while imprecise 1 s, then twice the last wait, up to
    /// `calibrate_every`.
    fn set_next(&mut self, precise: bool, calibrate_every: Duration) {
        self.every = if precise {
            None
        } else {
            Some(
                self.every
                    .map_or(IMPRECISE_RETRY, |every| every.saturating_mul(2))
                    .min(calibrate_every),
            )
        };
    }

    /// Whether a measurement whose fastest probe took `rtt_us` is at least as good as the one
    /// in use, whose error bound has grown with its age by the clocks' drift.
    fn is_better(&self, rtt_us: i64) -> bool {
        self.kept.is_none_or(|(kept_rtt, at)| {
            let age_s = i64::try_from(at.elapsed().as_secs()).unwrap_or(i64::MAX);
            rtt_us / 2 <= (kept_rtt / 2).saturating_add(age_s.saturating_mul(DRIFT_US_PER_SECOND))
        })
    }
}

/// Clears [`Schedule::running`] when the background measurement ends, or its runtime drops it.
struct Running(Connection);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.schedule().running = false;
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("offset_us", &self.inner.offset_us.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects and measures the clock offset; fails when Redis does not answer, or refuses
    /// the credentials ([`StoreErrorKind::AuthRefused`](crate::error::StoreErrorKind), naming
    /// the `url`'s password or user, never showing them).
    pub async fn connect(config: RedisConfig) -> Result<Connection, StoreError> {
        let connection = Connection::lazy(config).map_err(StoreError::config)?;
        match connection.calibrate().await {
            Ok(()) => Ok(connection),
            Err(e) if e.is_auth_refused() => Err(StoreError::auth_refused(format!(
                "{} ({})",
                connection.refusal(),
                e.detail()
            ))),
            Err(e) => Err(e),
        }
    }

    /// What a refused authentication says of the `url`'s credentials (never their values).
    fn refusal(&self) -> &'static str {
        let settings = self.inner.client.get_connection_info().redis_settings();
        match (settings.username(), settings.password()) {
            (_, None) => "the server requires a password and `url` gives none",
            (None, Some(_)) => "the server refused the password `url` gives",
            (Some(_), Some(_)) => "the server refused the user and password `url` gives",
        }
    }

    /// Logs, once each, that Redis began refusing the credentials and that it accepts them
    /// again (then measures the clock again): a refusal is a configuration error that does
    /// not pass by waiting.
    fn note_refused(&self, ended: Ended) {
        match ended {
            Ended::AuthRefused => {
                if !self.inner.refused.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        "redis refused authentication: {}; every command fails until it accepts them",
                        self.refusal()
                    );
                }
            }
            Ended::Answered => {
                if self.inner.refused.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis accepts the credentials again");
                    // Over a new connection, maybe to another server (the address moved, and
                    // the new one refused the password until it was set there): as after an
                    // outage, which the refusal hid from the backends.
                    self.recalibrate_soon();
                }
            }
            Ended::ConnectionFailed | Ended::Inconclusive => {}
        }
    }

    /// A connection that connects on first use: a process may start while Redis is down, and
    /// every command fails with [`StoreError`] until it is back. Needs a tokio runtime.
    ///
    /// The clock offset is measured on first use too: the first script of either backend (the
    /// rate limiter's decisions and reports, the task slots' creates, changes and snapshots)
    /// waits for the measurement (and, while Redis cannot be reached, does what its
    /// [`WhenUnreachable`](crate::WhenUnreachable) says), so a process whose clock is off
    /// never writes its own time into the fleet's state.
    pub fn lazy(config: RedisConfig) -> Result<Connection, ConfigError> {
        config.validate()?;
        let client = redis::Client::open(config.url.as_str())
            .map_err(|_| ConfigError::new("url", "is not a redis:// URL"))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(200));
        let connection =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                .map_err(|_| ConfigError::new("url", "cannot be used by the redis client"))?;
        Ok(Connection {
            inner: Arc::new(Inner {
                manager: std::sync::Mutex::new(Manager {
                    connection,
                    number: 0,
                    replaced: None,
                }),
                manager_config,
                reconnects: std::sync::Mutex::new(Reconnects::default()),
                refused: AtomicBool::new(false),
                prefix: config.prefix,
                timeout: config.command_timeout,
                offset_us: AtomicI64::new(0),
                base_us: AtomicI64::new(0),
                epoch: std::time::Instant::now(),
                calibrated: AtomicBool::new(false),
                first_calibration: tokio::sync::Mutex::new(None),
                #[cfg(feature = "testing")]
                local_skew_us: AtomicI64::new(0),
                calibrate_every: config.calibrate_every,
                schedule: std::sync::Mutex::new(Schedule::default()),
                #[cfg(feature = "testing")]
                stalled_probes: AtomicU32::new(0),
                #[cfg(feature = "testing")]
                stall_us: AtomicU64::new(0),
                client,
            }),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The command timeout.
    pub fn command_timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The measured offset of the server's clock from this process's, microseconds.
    pub fn clock_offset_us(&self) -> i64 {
        self.inner.offset_us.load(Ordering::Relaxed)
    }

    pub(crate) fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    /// Fleet time now: Unix microseconds on the server's clock (this process's own clock until
    /// the offset has been measured, see [`is_calibrated`](Self::is_calibrated)). Measured, it
    /// runs on the monotonic clock from the last measurement: a step of the system clock
    /// does not move it.
    pub fn now_us(&self) -> i64 {
        if self.is_calibrated() {
            self.inner.base_us.load(Ordering::Acquire) + self.mono_us()
        } else {
            self.local_us() + self.inner.offset_us.load(Ordering::Acquire)
        }
    }

    /// Monotonic microseconds since this connection was made.
    fn mono_us(&self) -> i64 {
        i64::try_from(self.inner.epoch.elapsed().as_micros()).unwrap_or(i64::MAX)
    }

    /// Measures the server's clock again at the next fleet-time read: after Redis was away
    /// (a failover may have brought a server whose clock differs).
    pub(crate) fn recalibrate_soon(&self) {
        let mut schedule = self.schedule();
        schedule.last = None;
        schedule.kept = None;
        schedule.generation += 1;
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.inner
            .schedule
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the offset to the server's clock has been measured: always after
    /// [`connect`](Self::connect); after the first successful command on a
    /// [`lazy`](Self::lazy) connection.
    pub fn is_calibrated(&self) -> bool {
        self.inner.calibrated.load(Ordering::Acquire)
    }

    /// Fleet time now, measured against the server's clock: before the first measurement
    /// succeeded, it is taken first (one request at a time; those that waited for a failed one
    /// get its error). Later measurements run in the background every `calibrate_every`.
    pub(crate) async fn calibrated_now_us(&self) -> Result<i64, StoreError> {
        loop {
            if self.is_calibrated() {
                self.maybe_calibrate();
                return Ok(self.now_us());
            }
            let failed = match self.inner.first_calibration.try_lock() {
                Ok(mut failed) => {
                    *failed = None;
                    let result = self.calibrate().await;
                    *failed = result.as_ref().err().cloned();
                    result?;
                    return Ok(self.now_us());
                }
                Err(_) => self.inner.first_calibration.lock().await.clone(),
            };
            if let Some(error) = failed
                && !self.is_calibrated()
            {
                return Err(error);
            }
            // Measured meanwhile, or the request measuring it gave up: look again.
        }
    }

    /// See [`testing::skew_local_clock`](crate::testing::skew_local_clock).
    #[cfg(feature = "testing")]
    pub(crate) fn skew_local_clock(&self, ahead_us: i64) {
        self.inner.local_skew_us.store(ahead_us, Ordering::Relaxed);
    }

    /// See [`testing::shift_fleet_clock`](crate::testing::shift_fleet_clock).
    #[cfg(feature = "testing")]
    pub(crate) fn shift_fleet_clock(&self, ahead_us: i64) {
        self.inner.base_us.fetch_add(ahead_us, Ordering::AcqRel);
        self.inner.offset_us.fetch_add(ahead_us, Ordering::AcqRel);
    }

    /// See [`testing::stall_clock_probes`](crate::testing::stall_clock_probes).
    #[cfg(feature = "testing")]
    pub(crate) fn stall_clock_probes(&self, probes: u32, by: Duration) {
        let by = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.inner.stall_us.store(by, Ordering::Relaxed);
        self.inner.stalled_probes.store(probes, Ordering::Relaxed);
    }

    /// A probe's answer read late, if the test asked for it.
    async fn maybe_stall_probe(&self) {
        #[cfg(feature = "testing")]
        {
            let stalled =
                self.inner
                    .stalled_probes
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            if stalled.is_ok() {
                let by = self.inner.stall_us.load(Ordering::Relaxed);
                tokio::time::sleep(Duration::from_micros(by)).await;
            }
        }
    }

    /// This process's clock, Unix microseconds.
    fn local_us(&self) -> i64 {
        #[cfg(feature = "testing")]
        {
            local_us() + self.inner.local_skew_us.load(Ordering::Relaxed)
        }
        #[cfg(not(feature = "testing"))]
        {
            local_us()
        }
    }

    /// Fleet time of a tokio instant of this process.
    pub(crate) fn to_fleet(&self, instant: Instant, now: Instant, now_us: i64) -> i64 {
        if instant >= now {
            now_us.saturating_add(micros(instant - now))
        } else {
            now_us.saturating_sub(micros(now - instant))
        }
    }

    /// The tokio instant of a fleet time.
    pub(crate) fn to_instant(&self, fleet_us: i64, now: Instant, now_us: i64) -> Instant {
        let delta = fleet_us.saturating_sub(now_us);
        if delta >= 0 {
            // Saturated: a fleet time past the clock's range (a pause of centuries) must not
            // panic.
            now.checked_add(Duration::from_micros(delta as u64))
                .or_else(|| now.checked_add(MAX_DURATION))
                .unwrap_or(now)
        } else {
            now.checked_sub(Duration::from_micros(delta.unsigned_abs()))
                .unwrap_or(now)
        }
    }

    /// Measures the offset to the server's clock now (`TIME`), keeping the fastest probe: three
    /// probes, or up to ten while none came back within a millisecond (on a loaded host a
    /// probe's answer can be read tens of milliseconds late, and the offset is then off by up
    /// to half that). The result replaces the offset in use only when its error bound is no
    /// worse than that one's grown with its age; while the offset in use is imprecise, the
    /// next measurement comes after a second, then two, … up to `calibrate_every`.
    pub async fn calibrate(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let started_mono = std::time::Instant::now();
        let generation = self.schedule().generation;
        let mut best: Option<(i64, i64, i64)> = None;
        for probe in 0..MAX_CLOCK_PROBES {
            if probe >= MIN_CLOCK_PROBES
                && best.is_some_and(|(rtt, _, _)| rtt <= PRECISE_ROUND_TRIP_US)
            {
                break;
            }
            let before = self.local_us();
            let before_mono = self.mono_us();
            let (secs, micros): (i64, i64) = self.query(&redis::cmd("TIME")).await?;
            self.maybe_stall_probe().await;
            let rtt = self.mono_us() - before_mono;
            let server = secs * 1_000_000 + micros;
            let offset = server - (before + rtt / 2);
            let base = server - (before_mono + rtt / 2);
            if best.is_none_or(|(r, _, _)| rtt < r) {
                best = Some((rtt, offset, base));
            }
        }
        let Some((rtt, offset, base)) = best else {
            return Ok(());
        };
        let mut schedule = self.schedule();
        if schedule.generation != generation && self.is_calibrated() {
            // Redis went away meanwhile: the next measurement, due at once, decides.
            return Ok(());
        }
        let kept = schedule.is_better(rtt);
        if kept {
            schedule.kept = Some((rtt, started_mono));
            self.inner.offset_us.store(offset, Ordering::Release);
            self.inner.base_us.store(base, Ordering::Release);
            self.inner.calibrated.store(true, Ordering::Release);
        }
        let precise = schedule
            .kept
            .is_some_and(|(kept_rtt, _)| kept_rtt <= PRECISE_ROUND_TRIP_US);
        schedule.set_next(precise, self.inner.calibrate_every);
        schedule.last = Some(started);
        drop(schedule);
        if !kept {
            tracing::debug!(
                rtt_us = rtt,
                "redis clock probes were slow; the earlier, more precise offset stays"
            );
        } else if !precise {
            tracing::debug!(
                rtt_us = rtt,
                "redis clock probes were slow; the offset is uncertain by half of that, measured again soon"
            );
        }
        if kept && offset.abs() > 1_000_000 {
            tracing::warn!(
                offset_us = offset,
                rtt_us = rtt,
                "local clock is off the redis server's clock by more than a second; corrected"
            );
        }
        Ok(())
    }

    /// Starts a calibration in the background when the last one is older than
    /// `calibrate_every` (sooner while the offset in use is imprecise), or there was none.
    pub(crate) fn maybe_calibrate(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.schedule().claim(self.inner.calibrate_every) {
            return;
        }
        let running = Running(self.clone());
        handle.spawn(async move {
            if running.0.calibrate().await.is_err() {
                running.0.schedule().last = None;
            }
        });
    }

    /// Runs one command with the timeout.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let since = self.backing_off()?;
        let (number, mut manager) = self.manager();
        let result = with_timeout(self.inner.timeout, cmd.query_async(&mut manager)).await;
        self.after_error(number, since, result)
    }

    /// Runs a script (`EVALSHA`, loading it when Redis has forgotten it) with the timeout.
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let since = self.backing_off()?;
        let (number, mut manager) = self.manager();
        let result = with_timeout(self.inner.timeout, invocation.invoke_async(&mut manager)).await;
        self.after_error(number, since, result)
    }

    /// Fails at once while connections keep failing: for 50 ms after the second failed one in
    /// a row, doubling up to 500 ms. Only the commands after that go to the connection
    /// manager, which connects again for the first of them: a process makes a few connection
    /// attempts a second while Redis refuses them, not one per command (a hundred a second
    /// and more, from every process of the fleet, against a Redis that is starting, or at its
    /// `maxclients`).
    /// Returns the failures counted so far, for [`after_error`](Self::after_error).
    fn backing_off(&self) -> Result<u64, StoreError> {
        let reconnects = self
            .inner
            .reconnects
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match reconnects.until {
            Some(until) if Instant::now() < until && reconnects.refused => {
                Err(StoreError::auth_refused(format!(
                    "refused {} times in a row; connecting again in {:?}",
                    reconnects.failures,
                    until - Instant::now()
                )))
            }
            Some(until) if Instant::now() < until => Err(StoreError::unreachable(format!(
                "{} failed connections in a row; connecting again in {:?}",
                reconnects.failures,
                until - Instant::now()
            ))),
            _ => Ok(reconnects.counted),
        }
    }

    /// The connection in use, and its number.
    fn manager(&self) -> (u64, ConnectionManager) {
        let manager = self.inner.manager.lock().unwrap_or_else(|e| e.into_inner());
        (manager.number, manager.connection.clone())
    }

    /// Notes how the command on the connection numbered `number` ended, for
    /// [`backing_off`](Self::backing_off), and replaces that connection when the server
    /// answered it `READONLY`: it
    /// reached a primary that a failover demoted to a replica, and the `redis` crate's
    /// connection manager reconnects only when the connection itself fails, so every write
    /// would be refused for as long as this connection lives. The new one connects, on its
    /// first command, to wherever the configured address leads now (the new primary once the
    /// failover moved it). At most one replacement every [`READONLY_RECONNECT_EVERY`]: while
    /// the address still leads to a replica, commands are refused as before, without a new
    /// connection each. Likewise when the server refused the credentials: the manager never
    /// connects again after that, and a password put right on the server would not be seen.
    fn after_error<T>(
        &self,
        number: u64,
        since: u64,
        result: Result<T, Failed>,
    ) -> Result<T, StoreError> {
        let ended = match &result {
            Ok(_) => Ended::Answered,
            Err(failed) => failed.ended,
        };
        self.inner
            .reconnects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(ended, since);
        self.note_refused(ended);
        let Failed {
            error, readonly, ..
        } = match result {
            Ok(value) => return Ok(value),
            Err(failed) => failed,
        };
        // A connection whose authentication was refused is never made again by the connection
        // manager (it reconnects after I/O errors only): every later command would get the
        // same refusal, even once the server accepts the password again.
        let refused = ended == Ended::AuthRefused;
        if !readonly && !refused {
            return Err(error);
        }
        let mut manager = self.inner.manager.lock().unwrap_or_else(|e| e.into_inner());
        let due = manager.number == number
            && manager
                .replaced
                .is_none_or(|at| at.elapsed() >= READONLY_RECONNECT_EVERY);
        if due
            && let Ok(connection) = ConnectionManager::new_lazy_with_config(
                self.inner.client.clone(),
                self.inner.manager_config.clone(),
            )
        {
            *manager = Manager {
                connection,
                number: number + 1,
                replaced: Some(Instant::now()),
            };
            drop(manager);
            if readonly {
                tracing::warn!(
                    "redis answered READONLY (a failover demoted the server this connection reached): connecting again"
                );
                self.recalibrate_soon();
            }
        }
        Err(error)
    }

    /// The key `prefix:rest`.
    pub(crate) fn key(&self, rest: &str) -> String {
        let mut key = String::with_capacity(self.inner.prefix.len() + 1 + rest.len());
        key.push_str(&self.inner.prefix);
        key.push(':');
        key.push_str(rest);
        key
    }
}

/// A failed command.
struct Failed {
    error: StoreError,
    /// How it ended.
    ended: Ended,
    /// Redis answered it `READONLY`.
    readonly: bool,
}

async fn with_timeout<T>(
    timeout: Duration,
    future: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, Failed> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => {
            let store_error = StoreError::from_redis(&error);
            let ended = if store_error.is_auth_refused() {
                Ended::AuthRefused
            } else if error.code().is_some() {
                Ended::Answered
            } else if error.is_connection_refusal()
                || error.is_connection_dropped()
                || (error.is_io_error() && !error.is_timeout())
            {
                Ended::ConnectionFailed
            } else {
                Ended::Inconclusive
            };
            Err(Failed {
                error: store_error,
                ended,
                readonly: error.code() == Some("READONLY"),
            })
        }
        Err(_) => Err(Failed {
            error: StoreError::timed_out(timeout),
            ended: Ended::Inconclusive,
            readonly: false,
        }),
    }
}

fn local_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Whole microseconds of a duration, rounded up (a wait is never shortened).
/// The longest duration a setting of this crate keeps: a year (kling-tower's `MAX_DURATION`).
/// A setter without a `Result` clamps to it; an instant that far ahead stays in the clock's
/// range.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

pub(crate) fn micros(duration: Duration) -> i64 {
    let us = duration.as_nanos().div_ceil(1000);
    i64::try_from(us).unwrap_or(i64::MAX)
}

/// A key segment that keeps `:` and `|` in account and pool names from colliding.
pub(crate) fn segment(text: &str) -> String {
    format!("{}.{}", text.len(), text)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Reconnects {
        /// Notes the end of a command that started now.
        fn note_now(&mut self, ended: Ended) {
            self.note(ended, self.counted);
        }
    }

    #[test]
    fn debug_never_shows_the_urls_password() {
        for url in [
            "redis://:hunter2@10.0.0.5:6379/0",
            "redis://admin:hunter2@10.0.0.5/",
            "rediss://hunter2@cache.example:6380",
        ] {
            let shown = format!("{:?}", RedisConfig::new(url));
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("***@"), "{shown}");
        }
        let shown = format!(
            "{:?}",
            RedisConfig::new("redis://127.0.0.1:6379/?protocol=3")
        );
        assert!(
            shown.contains("redis://127.0.0.1:6379/?protocol=3"),
            "{shown}"
        );
        // An `@` past the authority may end a password cut short (by a raw `#` here: host
        // `admin`, port 12): what follows the scheme up to it, and the query, are hidden.
        for (url, hidden) in [
            ("redis://admin:12#34@10.0.0.5/", "redis://***@10.0.0.5/"),
            ("redis://127.0.0.1:6379/?name=a@b", "redis://***@b"),
            ("redis://:a/b@10.0.0.5/?pass=c", "redis://***@10.0.0.5/?***"),
        ] {
            let shown = format!("{:?}", RedisConfig::new(url));
            assert!(
                shown.contains(&format!("url: \"{hidden}\"")),
                "{url}: {shown}"
            );
        }
    }

    /// A Unix socket URL carries its user and password in the query (`?user=…&pass=…`, which
    /// the `redis` crate reads), and a password with a raw `/`, `?` or `#` (a base64 one) makes
    /// the URL invalid, the very case whose configuration a user prints to see what is wrong:
    /// neither shows the password.
    #[test]
    fn debug_never_shows_a_password_in_the_query_or_in_an_invalid_url() {
        for url in [
            "redis+unix:///run/redis.sock?db=1&pass=hunter2",
            "unix:///run/redis.sock?pass=hunter2&user=admin",
            "redis+unix:///run/redis.sock?user=admin&pass=hunter2#frag",
            "redis://:hunter2/Xy+z==@10.0.0.5:6379/0",
            "redis://admin:hunt?er2@10.0.0.5:6379/0",
            "redis://admin:hunt#er2@10.0.0.5:6379/0",
        ] {
            let shown = format!("{:?}", RedisConfig::new(url));
            assert!(!shown.contains("hunter2"), "{url}: {shown}");
            assert!(!shown.contains("hunt"), "{url}: {shown}");
            assert!(!shown.contains("admin"), "{url}: {shown}");
        }
        // What is not a secret is still shown.
        let shown = format!(
            "{:?}",
            RedisConfig::new("redis+unix:///run/redis.sock?db=1&pass=hunter2")
        );
        assert!(
            shown.contains("redis+unix:///run/redis.sock?db=1&pass=***"),
            "{shown}"
        );
        let shown = format!(
            "{:?}",
            RedisConfig::new("redis://:hunter2/Xy@10.0.0.5:6379/0")
        );
        assert!(shown.contains("redis://***@10.0.0.5:6379/0"), "{shown}");
    }

    /// While imprecise, the wait before the next measurement doubles from 1 s up to
    /// `calibrate_every` and stays there; a precise measurement puts it back to
    /// `calibrate_every`, and the next imprecise one starts again from 1 s.
    #[test]
    fn an_imprecise_offset_is_measured_again_sooner_then_less_often() {
        let cap = Duration::from_secs(30);
        let mut schedule = Schedule::default();
        let mut waits = Vec::new();
        for _ in 0..8 {
            schedule.set_next(false, cap);
            waits.push(schedule.every.unwrap().as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        schedule.set_next(true, cap);
        assert_eq!(schedule.every, None);
        schedule.set_next(false, cap);
        assert_eq!(schedule.every, Some(Duration::from_secs(1)));
    }

    /// Commands fail at once from the second failed connection in a row, for 50 ms, then twice
    /// as long after each further failure up to 500 ms; an answer from Redis ends it, a timeout
    /// changes nothing.
    #[tokio::test(start_paused = true)]
    async fn failed_connections_in_a_row_back_off_from_50_ms_to_500() {
        let mut reconnects = Reconnects::default();
        reconnects.note_now(Ended::ConnectionFailed);
        assert_eq!(
            reconnects.until, None,
            "one failure: the next command connects"
        );
        let mut waits = Vec::new();
        for _ in 0..6 {
            reconnects.note_now(Ended::ConnectionFailed);
            waits.push((reconnects.until.unwrap() - Instant::now()).as_millis());
        }
        assert_eq!(waits, [50, 100, 200, 400, 500, 500]);
        reconnects.note_now(Ended::Inconclusive);
        assert_eq!(reconnects.failures, 7, "a timeout is no failed connection");
        reconnects.note_now(Ended::Answered);
        assert_eq!((reconnects.failures, reconnects.until), (0, None));
        // Commands that started before a counted failure failed with it: not counted again.
        let since = reconnects.counted;
        reconnects.note(Ended::ConnectionFailed, since);
        reconnects.note(Ended::ConnectionFailed, since);
        reconnects.note(Ended::AuthRefused, since);
        assert_eq!((reconnects.failures, reconnects.until), (1, None));
    }

    /// Refused credentials back off like failed connections (the connection manager would
    /// otherwise connect and authenticate again for every command), and the commands failed
    /// meanwhile say the credentials were refused, not that Redis is unreachable.
    #[tokio::test(start_paused = true)]
    async fn refused_credentials_back_off_as_a_refusal_not_as_unreachable() {
        let conn = Connection::lazy(RedisConfig::new("redis://:pw@127.0.0.1:1/")).unwrap();
        for _ in 0..FAILURES_BEFORE_BACKOFF {
            conn.inner
                .reconnects
                .lock()
                .unwrap()
                .note_now(Ended::AuthRefused);
        }
        let error = conn.backing_off().unwrap_err();
        assert_eq!(
            error.kind(),
            crate::error::StoreErrorKind::AuthRefused,
            "{error}"
        );
        assert!(!error.is_unreachable(), "{error}");
        tokio::time::advance(MIN_RECONNECT_BACKOFF).await;
        assert!(
            conn.backing_off().is_ok(),
            "the next command connects again"
        );
        // A failed connection after it is unreachable again.
        conn.inner
            .reconnects
            .lock()
            .unwrap()
            .note_now(Ended::ConnectionFailed);
        assert!(conn.backing_off().unwrap_err().is_unreachable());
    }

    /// One dropped connection is one failure, however many commands were on it: the server
    /// closing a healthy connection (`CLIENT KILL`, an idle `timeout`, a proxy) with several
    /// commands in flight does not make the next commands fail at once (as Redis away, in
    /// `Fail` mode a failed request each) while the manager has already connected again.
    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn commands_on_one_dropped_connection_count_as_one_failure() {
        let Some(server) =
            crate::testing::RedisServer::start_or_skip().expect("CI=true requires a redis-server")
        else {
            return;
        };
        let conn = Connection::lazy(
            RedisConfig::new(server.url()).command_timeout(Duration::from_secs(5)),
        )
        .unwrap();
        conn.calibrate().await.unwrap();
        // A blocking command first: the ones after it wait behind it on the one socket.
        let mut in_flight = tokio::task::JoinSet::new();
        let mut blpop = redis::cmd("BLPOP");
        blpop.arg("nothing").arg(3);
        in_flight.spawn({
            let conn = conn.clone();
            async move { conn.query::<redis::Value>(&blpop).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..6 {
            let conn = conn.clone();
            in_flight.spawn(async move { conn.query::<redis::Value>(&redis::cmd("PING")).await });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut killer = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let killed = crate::testing::kill_clients(&mut killer, crate::testing::Clients::Normal)
            .await
            .unwrap();
        assert_eq!(killed, 1);
        let mut failed = 0;
        while let Some(result) = in_flight.join_next().await {
            failed += usize::from(result.unwrap().is_err());
        }
        assert_eq!(failed, 7, "every command on the killed connection failed");
        // The manager connects again at once: the next command reaches Redis.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let pong: Result<String, _> = conn.query(&redis::cmd("PING")).await;
        assert_eq!(pong.unwrap(), "PONG");
    }

    /// A server that accepts the credentials again after refusing them is reached over a new
    /// connection, which may lead to another server (the address moved, and the new server
    /// refused the password until it was set there too): the clock is measured again, as
    /// after an outage, not kept for up to `calibrate_every`.
    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn the_clock_is_measured_again_once_refused_credentials_are_accepted() {
        let Some(server) =
            crate::testing::RedisServer::start_or_skip().expect("CI=true requires a redis-server")
        else {
            return;
        };
        let conn = Connection::lazy(RedisConfig::new(server.url())).unwrap();
        conn.calibrated_now_us().await.unwrap();
        // As if measured against another server, whose clock is 5 s ahead.
        conn.shift_fleet_clock(5_000_000);
        let mut admin = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let config_set = |password: &str| {
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("SET").arg("requirepass").arg(password);
            cmd
        };
        let _: () = config_set("pw").query_async(&mut admin).await.unwrap();
        crate::testing::kill_clients(&mut admin, crate::testing::Clients::Normal)
            .await
            .unwrap();
        // The first command may still go to the killed connection.
        let mut refused = None;
        for _ in 0..50 {
            match conn.query::<String>(&redis::cmd("PING")).await {
                Err(e) if e.is_auth_refused() => {
                    refused = Some(e);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        assert!(refused.is_some(), "the server refused the connection");
        let _: () = config_set("").query_async(&mut admin).await.unwrap();
        let mut answered = false;
        for _ in 0..100 {
            if conn.query::<String>(&redis::cmd("PING")).await.is_ok() {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered, "accepted again");
        conn.calibrated_now_us().await.unwrap();
        // The measurement runs in the background.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            conn.clock_offset_us().abs() < 1_000_000,
            "offset {} µs: the other server's",
            conn.clock_offset_us()
        );
    }

    /// One background measurement at a time: none is claimed while one runs, even when due.
    #[tokio::test(start_paused = true)]
    async fn a_measurement_is_not_started_while_one_runs() {
        let every = Duration::from_secs(30);
        let mut schedule = Schedule::default();
        assert!(schedule.claim(every), "none yet: due");
        assert!(!schedule.claim(every), "one runs");
        tokio::time::advance(every).await;
        assert!(!schedule.claim(every), "due, but one still runs");
        schedule.running = false;
        assert!(schedule.claim(every));
    }

    /// A measurement that started before Redis went away (`recalibrate_soon`) is not kept once
    /// an offset is in use: it may have measured the server that went away.
    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn a_measurement_across_a_recalibration_is_not_kept() {
        let Some(server) =
            crate::testing::RedisServer::start_or_skip().expect("CI=true requires a redis-server")
        else {
            return;
        };
        let conn = Connection::lazy(RedisConfig::new(server.url())).unwrap();
        conn.calibrate().await.unwrap();
        let before = conn.clock_offset_us();
        // Were it kept, the next measurement would move the offset by 5 s.
        conn.skew_local_clock(5_000_000);
        conn.stall_clock_probes(10, Duration::from_millis(30));
        let measuring = tokio::spawn({
            let conn = conn.clone();
            async move { conn.calibrate().await }
        });
        // Redis goes away once the measurement has begun (its first probe is out).
        while conn.inner.stalled_probes.load(Ordering::Relaxed) == 10 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        conn.recalibrate_soon();
        measuring.await.unwrap().unwrap();
        assert!((conn.clock_offset_us() - before).abs() < 1_000_000);
        // The next one is kept, whatever its precision.
        conn.calibrate().await.unwrap();
        assert!((conn.clock_offset_us() - before + 5_000_000).abs() < 1_000_000);
    }
}
