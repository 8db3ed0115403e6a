//! [`WhenUnreachable`]: what the backends do while Redis cannot be reached.

use std::num::NonZeroU32;
use std::time::Duration;

/// What a backend does while Redis cannot be reached (refused, timed out, restarting).
///
/// "Cannot be reached" includes a Redis that answers but cannot serve yet: `LOADING`
/// (restarting with persistence), `MASTERDOWN`, `TRYAGAIN` (see
/// [`StoreErrorKind::Unreachable`](crate::error::StoreErrorKind::Unreachable)). A Redis that
/// refuses the credentials does not: waiting or falling back would hide a configuration
/// error, so every mode fails at once with
/// [`StoreErrorKind::AuthRefused`](crate::error::StoreErrorKind::AuthRefused).
///
/// | choice | rate limiter | task slots | over-admission during the outage |
/// |---|---|---|---|
/// | [`Wait`](Self::Wait) (default, fail closed) | requests wait, asking again every `retry_every`; the layer's `max_wait` and a request's `Deadline` turn the wait into its typed error | creates wait, likewise; a `Deadline` ends the wait | none |
/// | [`Fail`](Self::Fail) (fail closed at once) | requests fail with the rate limiter's `BackendError` | creates fail with the slots' `BackendError` | none |
/// | [`Fallback`](Self::Fallback) | each process paces alone at `1/processes` of the quota, from the end of the fleet's pause of the key it last heard of | each process admits up to `⌊capacity/processes⌋` slots per pool, counting the tasks it already holds | at most one process's share |
///
/// In every mode the changes a process makes while Redis is away (tasks held, ended, given
/// back) and the pauses (1302, `Retry-After`) it could not report are kept and replayed when it
/// returns (a pause holds in the process meanwhile), and after Redis lost its state (a restart
/// without persistence) every process registers again the slots it holds before new creates
/// are admitted (see the crate docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenUnreachable {
    /// Fail closed by waiting until Redis is back.
    #[default]
    Wait,
    /// Fail closed at once with an error.
    Fail,
    /// Fall back to an in-process limiter with this process's share of the fleet's limits.
    Fallback {
        /// How many processes share the account: each gets `1/processes` of the rate and
        /// `⌊capacity/processes⌋` slots of each pool.
        processes: NonZeroU32,
    },
}

impl WhenUnreachable {
    /// [`WhenUnreachable::Fallback`] for a fleet of `processes` (at least 1).
    pub fn fallback(processes: u32) -> Self {
        WhenUnreachable::Fallback {
            processes: NonZeroU32::new(processes).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// The default interval at which a waiting request asks an unreachable Redis again.
pub const DEFAULT_RETRY_EVERY: Duration = Duration::from_millis(100);
