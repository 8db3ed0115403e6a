//! The errors kling-batch reports: small types with a one-line, lowercase `Display`.

use std::fmt;

/// A line of the jobs file that is not a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobError {
    line: usize,
    reason: String,
}

impl JobError {
    /// An error about `line` (1-based).
    pub fn new(line: usize, reason: impl Into<String>) -> Self {
        JobError {
            line,
            reason: reason.into(),
        }
    }

    /// The 1-based line number.
    pub fn line(&self) -> usize {
        self.line
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for JobError {}

/// The journal database failed or holds something unexpected.
#[derive(Debug)]
pub struct JournalError {
    context: &'static str,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl JournalError {
    pub(crate) fn new(
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        JournalError {
            context,
            source: source.into(),
        }
    }

    /// What the journal was doing.
    pub fn context(&self) -> &str {
        self.context
    }
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "journal: {}: {}", self.context, self.source)
    }
}

impl std::error::Error for JournalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

impl From<rusqlite::Error> for JournalError {
    fn from(e: rusqlite::Error) -> Self {
        JournalError::new("sqlite", e)
    }
}

/// A setting the tool cannot run with, naming the option, field or variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupError {
    field: String,
    reason: String,
}

impl SetupError {
    /// An error about `field` (an option such as `--jobs`, a config key, or a variable).
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SetupError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The option, field or variable at fault.
    pub fn field(&self) -> &str {
        &self.field
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for SetupError {}

/// A result file could not be saved.
#[derive(Debug)]
pub struct DownloadError {
    what: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl DownloadError {
    pub(crate) fn new(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        DownloadError {
            what: what.into(),
            source: source.into(),
        }
    }

    /// The URL or path concerned.
    pub fn what(&self) -> &str {
        &self.what
    }
}

impl fmt::Display for DownloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "download of {}: {}", self.what, self.source)
    }
}

impl std::error::Error for DownloadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
