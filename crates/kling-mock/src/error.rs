//! The error of the in-process service.

use std::fmt;

/// The mock dropped the connection instead of answering (the `drop_rate` fault, before the
/// request was carried out, or the `lost_answer_rate` fault, after).
///
/// Over TCP the connection is closed without a response; in process the call fails with this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockError {
    _private: (),
}

impl MockError {
    pub(crate) fn dropped() -> Self {
        MockError { _private: () }
    }
}

impl fmt::Display for MockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped by mock")
    }
}

impl std::error::Error for MockError {}
