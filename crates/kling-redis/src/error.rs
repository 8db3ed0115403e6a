//! Errors of the Redis backends.
//!
//! The layers see them as their own backend errors
//! ([`kling_ratelimit::error::BackendError`], [`kling_concurrency::error::BackendError`]),
//! whose source (for the rate limiter) is a [`StoreError`].

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// What went wrong talking to Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// Redis could not be reached (refused, reset, no connection yet), or answered that it
    /// cannot serve commands for now: `LOADING` (restarting with persistence), `MASTERDOWN`
    /// (a replica that lost its primary), `TRYAGAIN` — the errors the `redis` crate marks
    /// [`RetryMethod::WaitAndRetry`](redis::RetryMethod::WaitAndRetry). Both backends treat
    /// it as [`WhenUnreachable`](crate::WhenUnreachable) says.
    Unreachable,
    /// A command took longer than the command timeout.
    TimedOut,
    /// Redis answered something the backend does not understand, or refused the script.
    Protocol,
    /// The configuration is invalid.
    Config,
    /// Redis refused this client's credentials: a wrong password or ACL user in the
    /// configured `url` (`WRONGPASS`, the `redis` crate's `AuthenticationFailed`), or none
    /// given to a server that requires one (`NOAUTH`). Not [`Unreachable`](Self::Unreachable):
    /// Redis answered, and waiting does not fix a configuration, so every
    /// [`WhenUnreachable`](crate::WhenUnreachable) mode fails with it at once.
    AuthRefused,
}

/// A failed Redis command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreError {
    kind: StoreErrorKind,
    detail: String,
}

impl StoreError {
    pub(crate) fn from_redis(error: &redis::RedisError) -> Self {
        // Before the `Unreachable` test: the `redis` crate marks `AuthenticationFailed`
        // "reconnect", which would make a wrong password look like a Redis that is away.
        let kind = if error.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"))
            // A server that requires a password the `url` does not give answers a command of
            // many arguments (every script) so, not `NOAUTH`, and closes the connection.
            || (error.code() == Some("ERR")
                && error
                    .detail()
                    .is_some_and(|d| d.starts_with("Protocol error: unauthenticated")))
        {
            StoreErrorKind::AuthRefused
        } else if error.is_timeout() {
            StoreErrorKind::TimedOut
        } else if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_unrecoverable_error()
            // A restart or failover in progress: Redis is there but cannot serve yet.
            || matches!(error.retry_method(), redis::RetryMethod::WaitAndRetry)
            // A primary demoted by a failover (the connection is replaced: see
            // `Connection::after_error`), a replica cut off from its primary, a script or a
            // memory limit busy for now: the change is kept and replayed, not dropped.
            || matches!(
                error.code(),
                Some("READONLY" | "MASTERDOWN" | "LOADING" | "BUSY" | "TRYAGAIN" | "OOM")
            )
        {
            StoreErrorKind::Unreachable
        } else {
            StoreErrorKind::Protocol
        };
        StoreError {
            kind,
            detail: error.to_string(),
        }
    }

    pub(crate) fn unreachable(detail: impl Into<String>) -> Self {
        StoreError {
            kind: StoreErrorKind::Unreachable,
            detail: detail.into(),
        }
    }

    pub(crate) fn auth_refused(detail: impl Into<String>) -> Self {
        StoreError {
            kind: StoreErrorKind::AuthRefused,
            detail: detail.into(),
        }
    }

    pub(crate) fn timed_out(after: Duration) -> Self {
        StoreError {
            kind: StoreErrorKind::TimedOut,
            detail: format!("no answer within {after:?}"),
        }
    }

    pub(crate) fn protocol(detail: impl Into<String>) -> Self {
        StoreError {
            kind: StoreErrorKind::Protocol,
            detail: detail.into(),
        }
    }

    pub(crate) fn config(error: ConfigError) -> Self {
        StoreError {
            kind: StoreErrorKind::Config,
            detail: error.to_string(),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Whether Redis is (for now) out of reach: unreachable or timed out.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Unreachable | StoreErrorKind::TimedOut
        )
    }

    /// Whether Redis refused the configured credentials ([`StoreErrorKind::AuthRefused`]).
    pub fn is_auth_refused(&self) -> bool {
        self.kind == StoreErrorKind::AuthRefused
    }

    /// Whether Redis ran nothing of the command and a change it carried is kept for replay:
    /// out of reach, or refusing the credentials (the change is sent once it accepts them).
    pub(crate) fn keeps_changes(&self) -> bool {
        self.is_unreachable() || self.is_auth_refused()
    }

    /// The `redis` crate's description, or the timeout.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    pub(crate) fn into_ratelimit(self) -> kling_ratelimit::error::BackendError {
        if self.is_unreachable() {
            kling_ratelimit::error::BackendError::unreachable(self)
        } else if self.is_auth_refused() {
            kling_ratelimit::error::BackendError::auth_refused(self)
        } else {
            kling_ratelimit::error::BackendError::protocol(self)
        }
    }

    pub(crate) fn into_slots(self) -> kling_concurrency::error::BackendError {
        kling_concurrency::error::BackendError::new(self.to_string())
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            StoreErrorKind::Unreachable => "redis unreachable",
            StoreErrorKind::TimedOut => "redis command timed out",
            StoreErrorKind::Protocol => "redis protocol error",
            StoreErrorKind::Config => "redis configuration invalid",
            StoreErrorKind::AuthRefused => {
                "redis refused authentication: check the password (and user) in the redis \
                 backend's `url`"
            }
        };
        write!(f, "{what}: {}", self.detail)
    }
}

impl StdError for StoreError {}

/// Invalid configuration, naming the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    reason: &'static str,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: &'static str) -> Self {
        ConfigError { field, reason }
    }

    /// The offending field.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// Why it is invalid.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid redis backend configuration: {} {}",
            self.field, self.reason
        )
    }
}

impl StdError for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a connection gets for the server's error reply `line` (without CRLF).
    fn server_error(line: &str) -> redis::RedisError {
        let reply = redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .expect("a valid error reply");
        reply.extract_error().expect_err("an error reply")
    }

    #[test]
    fn restart_and_failover_replies_count_as_unreachable() {
        for line in [
            "LOADING Redis is loading the dataset in memory",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            // A primary demoted by a failover: writes refused until the client reconnects.
            "READONLY You can't write against a read only replica.",
            "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.",
            "OOM command not allowed when used memory > 'maxmemory'.",
        ] {
            let error = StoreError::from_redis(&server_error(line));
            assert_eq!(error.kind(), StoreErrorKind::Unreachable, "{line}: {error}");
            assert!(error.is_unreachable(), "{line}");
            assert_eq!(
                error.into_ratelimit().kind(),
                kling_ratelimit::error::BackendErrorKind::Unreachable
            );
        }
    }

    /// A refused password or user is its own kind, never `Unreachable` (which would make
    /// `Wait` wait and `Fallback` fall back for ever), and names the `url`.
    #[test]
    fn refused_credentials_are_their_own_kind_not_unreachable() {
        let refusals = [
            server_error("NOAUTH Authentication required."),
            server_error("WRONGPASS invalid username-password pair or user is disabled."),
            // An `EVALSHA` (more than 10 arguments) to a server that requires a password.
            server_error("ERR Protocol error: unauthenticated multibulk length"),
            server_error("ERR Protocol error: unauthenticated bulk length"),
            redis::RedisError::from((
                redis::ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )),
        ];
        for refusal in refusals {
            let error = StoreError::from_redis(&refusal);
            assert_eq!(
                error.kind(),
                StoreErrorKind::AuthRefused,
                "{refusal}: {error}"
            );
            assert!(!error.is_unreachable(), "{error}");
            assert!(error.keeps_changes(), "{error}: Redis ran nothing");
            assert!(error.to_string().contains("`url`"), "{error}");
            assert_eq!(
                error.into_ratelimit().kind(),
                kling_ratelimit::error::BackendErrorKind::AuthRefused
            );
        }
    }

    #[test]
    fn script_and_command_errors_stay_protocol_errors() {
        for line in [
            "ERR Error running script (call to f_0): user_script:1: bad argument",
            "NOSCRIPT No matching script. Please use EVAL.",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ] {
            let error = StoreError::from_redis(&server_error(line));
            assert_eq!(error.kind(), StoreErrorKind::Protocol, "{line}: {error}");
            assert!(!error.is_unreachable(), "{line}");
        }
    }
}
