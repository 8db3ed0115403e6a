//! Errors of this crate: invalid configuration.

use std::fmt;

/// A [`MonitorBuilder`](crate::MonitorBuilder) setting that cannot work, naming the field.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError {
    field: &'static str,
    reason: &'static str,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: &'static str) -> Self {
        ConfigError { field, reason }
    }

    /// The offending field, e.g. `usage_threshold`.
    pub fn field(&self) -> &'static str {
        self.field
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid metrics configuration: `{}` {}",
            self.field, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}
