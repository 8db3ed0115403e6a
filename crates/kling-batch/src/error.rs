//! The errors kling-batch reports: small types with a one-line, lowercase `Display`.

use std::fmt;

use crate::journal::ApiOrigin;

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

    /// The refusal of the jobs file (`JOBS`) when the journal refused jobs edited under their
    /// id ([`ChangedJobs`]): the file is at fault, not the journal. `None` for any other error,
    /// which its caller names by what it knows of the journal.
    pub(crate) fn changed_jobs_refusal(&self) -> Option<SetupError> {
        let changed = self.source.downcast_ref::<ChangedJobs>()?;
        Some(SetupError::new("JOBS", changed.to_string()))
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

/// Jobs of the file whose id the journal holds for a different job: their body or endpoint
/// changed since the journal recorded them. Running them under the recorded state would
/// report one job's task as another's, so the run is refused and nothing is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangedJobs {
    jobs: Vec<(String, usize)>,
}

impl ChangedJobs {
    pub(crate) fn new(jobs: Vec<(String, usize)>) -> Self {
        ChangedJobs { jobs }
    }

    /// The ids of the changed jobs, in file order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.jobs.iter().map(|(id, _)| id.as_str())
    }
}

impl fmt::Display for ChangedJobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (one, rest) = match self.jobs.len() {
            1 => ("job", "its body or endpoint differs from the job"),
            _ => ("jobs", "their bodies or endpoints differ from the jobs"),
        };
        write!(f, "{one} ")?;
        for (i, (id, line)) in self.jobs.iter().enumerate().take(10) {
            write!(f, "{}`{id}` (line {line})", if i > 0 { ", " } else { "" })?;
        }
        if self.jobs.len() > 10 {
            write!(f, " and {} more", self.jobs.len() - 10)?;
        }
        write!(
            f,
            ": {rest} the journal recorded under that id; give a changed job a new `id` (or \
             undo the change), or use another journal; nothing was sent"
        )
    }
}

impl std::error::Error for ChangedJobs {}

/// A journal whose jobs were sent to another API than the one a run is about to send to
/// ([`Journal::bind_base_url`](crate::journal::Journal::bind_base_url)): their tasks are not
/// there, and a resume that looked them up there would find none and create the jobs again
/// (billed twice). Nothing is written, and nothing is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherBaseUrl {
    recorded: ApiOrigin,
    current: ApiOrigin,
    moved_from: Option<ApiOrigin>,
}

impl OtherBaseUrl {
    pub(crate) fn new(
        recorded: ApiOrigin,
        current: ApiOrigin,
        moved_from: Option<ApiOrigin>,
    ) -> Self {
        OtherBaseUrl {
            recorded,
            current,
            moved_from,
        }
    }

    /// Where the journal's jobs were sent.
    pub fn recorded(&self) -> &ApiOrigin {
        &self.recorded
    }

    /// Where the run would have sent.
    pub fn current(&self) -> &ApiOrigin {
        &self.current
    }

    /// The base URL the caller said this one replaces, which is not the one recorded.
    pub fn moved_from(&self) -> Option<&ApiOrigin> {
        self.moved_from.as_ref()
    }
}

impl fmt::Display for OtherBaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "its jobs were sent to {}, and this run sends to {}",
            self.recorded, self.current
        )?;
        if let Some(moved_from) = &self.moved_from {
            write!(
                f,
                " (said to replace {moved_from}, which the journal does not name)"
            )?;
        }
        write!(
            f,
            ": their tasks are not there, and a resume looking them up there would find none \
             and create those jobs again (billed twice); nothing was written"
        )
    }
}

impl std::error::Error for OtherBaseUrl {}

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

    /// The same error, naming `field` instead (a library's field as the option that set it).
    pub(crate) fn renamed(self, field: impl Into<String>) -> Self {
        SetupError {
            field: field.into(),
            ..self
        }
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for SetupError {}

/// Why a run ended without its report: refused before anything was sent, or stopped by its
/// journal after it began sending.
#[derive(Debug)]
#[non_exhaustive]
pub enum RunError {
    /// Refused before any request was sent: a setting, the jobs file (a job edited under its
    /// id), or a journal that could not be read or written at the start.
    Setup(SetupError),
    /// A journal write failed after the run began sending, and the run stopped: creates may
    /// have left and tasks may have been billed. A create is marked in the journal before it
    /// is sent, so a run on the same journal, once the cause is fixed, looks up every create
    /// this one may have sent and creates none twice.
    Sent(JournalError),
}

impl RunError {
    /// Whether requests may have been sent (and tasks billed) before the run stopped.
    pub fn sent(&self) -> bool {
        matches!(self, RunError::Sent(_))
    }
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Setup(e) => write!(f, "{e}"),
            RunError::Sent(e) => write!(
                f,
                "{e}; the run stopped after it began sending: jobs may have been created and \
                 billed. Each create was marked in the journal before it was sent: fix the cause \
                 (disk space, permissions) and run again on the same journal, which looks those \
                 jobs up and creates none twice; do not delete the journal or start over with \
                 another"
            ),
        }
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunError::Setup(e) => Some(e),
            RunError::Sent(e) => Some(e),
        }
    }
}

impl From<SetupError> for RunError {
    fn from(e: SetupError) -> Self {
        RunError::Setup(e)
    }
}

/// A result file could not be saved.
///
/// Its `Debug` shows the URL as its `Display` does, without query and user info (a result
/// URL's query is its signature); [`what`](Self::what) keeps it whole.
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

    /// Whether the download gave up waiting ([`TimedOut`](crate::download::TimedOut)).
    pub fn is_timeout(&self) -> bool {
        self.source.is::<crate::download::TimedOut>()
    }

    /// The result server's answer, when it was no `200`.
    pub fn http_status(&self) -> Option<&crate::download::HttpStatus> {
        self.source.downcast_ref()
    }

    /// Whether the file was answered as an expired result URL answers
    /// ([`HttpStatus::is_final`](crate::download::HttpStatus::is_final)): gone for good only
    /// for a URL past its lifetime ([`expired`](crate::download::expired)).
    pub fn is_gone(&self) -> bool {
        self.http_status()
            .is_some_and(crate::download::HttpStatus::is_final)
    }
}

impl fmt::Debug for DownloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DownloadError")
            .field("what", &shown(&self.what))
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for DownloadError {
    /// A URL is shown without its query and user info: a result URL's query is often its
    /// signature, and this line goes to stderr and CI logs ([`what`](Self::what) keeps it whole).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "download of {}: {}", shown(&self.what), self.source)
    }
}

/// `what` as [`DownloadError`]'s `Display` shows it: a URL as `scheme://host[:port]/path`;
/// one `http` cannot read (a space or a non-ASCII character in it) cut as [`cut_url`] cuts it,
/// since a report may name any text and its query is still a signature; anything else (a
/// path) as it is.
pub(crate) fn shown(what: &str) -> std::borrow::Cow<'_, str> {
    match what.parse::<http::Uri>() {
        Ok(uri) if uri.scheme().is_some() && uri.host().is_some() => {
            let (scheme, host) = (
                uri.scheme_str().unwrap_or_default(),
                uri.host().unwrap_or_default(),
            );
            let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
            format!("{scheme}://{host}{port}{}", uri.path()).into()
        }
        _ if what.contains("://") => cut_url(what).into(),
        _ => what.into(),
    }
}

/// A URL that cannot be read as one, cut at its query or fragment and without the user info
/// before an `@`, which may hold a password or a token.
fn cut_url(url: &str) -> String {
    let cut = &url[..url.find(['?', '#']).unwrap_or(url.len())];
    let (scheme, rest) = cut
        .find("://")
        .map_or(("", cut), |at| cut.split_at(at + "://".len()));
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let rest = authority.rfind('@').map_or(rest, |at| &rest[at + 1..]);
    format!("{scheme}{rest}")
}

/// A URL the user gave, as an error names it: [`shown`] when it reads as one; else (a space
/// in its token, no scheme) cut at its query or fragment and without the user info before an
/// `@`, which may hold a password or a token. One with an `@` outside the user info `http`
/// reads (a `/`, `?` or `#` in a password ends the host there, so the rest of the password
/// reads as a path) is named by its scheme alone. The second value says whether anything was
/// cut.
pub(crate) fn shown_url(url: &str) -> (std::borrow::Cow<'_, str>, bool) {
    if !at_signs_in_user_info(url) {
        let scheme = url.find("://").map_or("", |at| &url[..at + "://".len()]);
        return (format!("{scheme}…").into(), true);
    }
    let text = match url.parse::<http::Uri>() {
        Ok(uri) if uri.scheme().is_some() && uri.host().is_some() => shown(url),
        _ => cut_url(url).into(),
    };
    let cut = text != url;
    (text, cut)
}

/// Whether every `@` of `url` is in its authority, as `http` reads it (or, for a text it
/// cannot read, up to the first `/` after the scheme, as [`cut_url`] reads it): a `/`, `?` or
/// `#` in a password ends the host there (`https://kb:443/pass@proxy` reads as host `kb`, port
/// 443 and path `/pass@proxy`), so an `@` past the authority may follow a piece of a password.
fn at_signs_in_user_info(url: &str) -> bool {
    let at_signs = |text: &str| text.matches('@').count();
    let in_authority = match url.parse::<http::Uri>() {
        Ok(uri) => uri.authority().map_or(0, |a| at_signs(a.as_str())),
        Err(_) => {
            let rest = url.find("://").map_or(url, |at| &url[at + "://".len()..]);
            at_signs(&rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())])
        }
    };
    in_authority == at_signs(url)
}

/// A URL as a `Debug` output shows it: `scheme://host[:port]/path` (no user info, query or
/// fragment, which may hold a password or a token), or `<redacted>` when it cannot be read as
/// such a URL, or has an `@` outside the user info `http` reads: a `/`, `?` or `#` in a
/// password ends the host there (`https://kb:443/pass@proxy` reads as host `kb`, port 443 and
/// path `/pass@proxy`), and the rest of the password would be shown as a path.
pub(crate) fn redacted_url(url: &str) -> std::borrow::Cow<'_, str> {
    match url.parse::<http::Uri>() {
        Ok(uri) if uri.scheme().is_some() && uri.host().is_some() && at_signs_in_user_info(url) => {
            shown(url)
        }
        _ => "<redacted>".into(),
    }
}

impl std::error::Error for DownloadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result URL's query (its signature) and user info never reach the error's text.
    #[test]
    fn a_download_error_shows_a_url_without_its_query() {
        let error = DownloadError::new(
            "https://u:pw@cdn.example:8443/outputs/t/0.mp4?sig=SECRET",
            std::io::Error::other("reset"),
        );
        let text = error.to_string();
        assert_eq!(
            text,
            "download of https://cdn.example:8443/outputs/t/0.mp4: reset"
        );
        assert!(error.what().contains("SECRET"), "kept whole for the caller");
        // Nor its `Debug`, which a caller's `{:?}` (an `unwrap`, a log) prints.
        let debug = format!("{error:?}");
        assert!(
            !debug.contains("SECRET") && !debug.contains("pw"),
            "{debug}"
        );
        assert!(
            debug.contains("cdn.example:8443/outputs/t/0.mp4"),
            "{debug}"
        );
        let path = DownloadError::new("/tmp/out/0.part", std::io::Error::other("full"));
        assert_eq!(path.to_string(), "download of /tmp/out/0.part: full");
    }

    /// A result URL that `http` cannot read (a space or a non-ASCII character in it: Kling's
    /// reports may hold any text) fails at once, and its error showed the URL whole, its
    /// signature and user info included, on stderr.
    #[test]
    fn a_download_error_hides_the_query_of_a_url_it_cannot_read() {
        for (url, shown) in [
            (
                "https://u:pw@cdn.example/outputs/视频 0.mp4?sig=SECRET#SECRET",
                "download of https://cdn.example/outputs/视频 0.mp4: bad",
            ),
            (
                "https://cdn.example/a b.mp4?x-oss-signature=SECRET",
                "download of https://cdn.example/a b.mp4: bad",
            ),
        ] {
            let text = DownloadError::new(url, std::io::Error::other("bad")).to_string();
            assert!(!text.contains("SECRET") && !text.contains("pw"), "{text}");
            assert_eq!(text, shown);
        }
        // A path is still shown as it is, `?` and `#` included.
        let path = DownloadError::new("/tmp/out?#/0.part", std::io::Error::other("full"));
        assert_eq!(path.to_string(), "download of /tmp/out?#/0.part: full");
    }

    /// A URL the user gave whose password holds a `/`, `?` or `#` reads as a host, a port and
    /// a path that holds the rest of the password: an error named it so.
    #[test]
    fn a_url_whose_password_ends_its_host_early_is_named_by_its_scheme_alone() {
        for url in [
            "ftp://kb:443/HUNTER2@proxy/hooks",
            "https://kb:443/HUNTER2@proxy/hooks",
            "https://kb/HUNTER2@proxy",
            "https://kb:HUN/TER2@proxy",
            "https://kb:HUN TER2/x@proxy",
            "https://kb/HUNTER2@proxy with a space",
        ] {
            let (text, cut) = shown_url(url);
            assert!(
                !text.contains("HUNTER2") && !text.contains("TER2"),
                "{url}: {text}"
            );
            assert!(cut, "{url}");
        }
        assert_eq!(shown_url("ftp://kb:443/HUNTER2@proxy").0, "ftp://…");
        // Still named as before: user info `http` reads, and a URL with no `@`.
        assert_eq!(
            shown_url("https://kb:pw@proxy.example/hooks?k=1"),
            ("https://proxy.example/hooks".into(), true)
        );
        assert_eq!(
            shown_url("ftp://proxy.example/hooks"),
            ("ftp://proxy.example/hooks".into(), false)
        );
        let refused = crate::callbacks::callback_path("ftp://kb:443/HUNTER2@proxy").unwrap_err();
        assert!(!refused.to_string().contains("HUNTER2"), "{refused}");
    }
}
