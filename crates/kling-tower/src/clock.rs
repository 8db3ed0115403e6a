//! Wall-clock time, injectable so paused-time tests are exact.
//!
//! JWT claims and webhook timestamps are Unix seconds: they need the wall clock, which
//! `tokio::time::pause()` cannot stop. Layers read it through [`WallClock`]; tests give them a
//! [`TokioWallClock`], whose seconds follow tokio's (paused) clock from a fixed start.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of Unix time.
pub trait WallClock: fmt::Debug + Send + Sync + 'static {
    /// Now, as a duration since the Unix epoch.
    fn unix_now(&self) -> Duration;

    /// Whether this clock's time passes as tokio's clock's does, so that "has this much time
    /// passed since I read you" may be asked of tokio's clock instead (`false` unless a clock
    /// says so). The auth layer then checks its cached token against the call's reading of
    /// tokio's clock ([`kling_core::call_clock`]), which the stack has read already, instead of
    /// reading the wall clock for every request.
    fn passes_with_tokio(&self) -> bool {
        false
    }
}

/// The system's clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn unix_now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }

    /// Between steps of the system's clock, yes; and across one, the time that really passed
    /// (what tokio's monotonic clock counts) is what decides when a token signed before it
    /// expires at the server, whose own clock did not step. Not across a suspend of the
    /// machine: the monotonic clock stops while the server's time goes on, so after a resume a
    /// cached token can look fresh when it has expired. The server then answers `1004`, and
    /// the auth layer signs a new token and the request goes again (one refused request per
    /// resume).
    fn passes_with_tokio(&self) -> bool {
        true
    }
}

/// Unix time that advances with tokio's clock from a fixed start, so `tokio::time::advance`
/// moves it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokioWallClock {
    start_unix: Duration,
    start: tokio::time::Instant,
}

impl TokioWallClock {
    /// Starts at the system's time now.
    pub fn new() -> Self {
        TokioWallClock::starting_at(SystemClock.unix_now())
    }

    /// Starts at the given Unix time (now, in tokio's clock).
    pub fn starting_at(unix: Duration) -> Self {
        TokioWallClock {
            start_unix: unix,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioWallClock {
    fn default() -> Self {
        TokioWallClock::new()
    }
}

impl WallClock for TokioWallClock {
    fn unix_now(&self) -> Duration {
        self.start_unix + self.start.elapsed()
    }

    fn passes_with_tokio(&self) -> bool {
        true
    }
}
