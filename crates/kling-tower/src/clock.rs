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
}
