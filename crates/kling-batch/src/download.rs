//! Saving result files (`--download DIR`): each task's files as soon as it succeeds, since
//! Kling's result URLs expire after 30 days.
//!
//! Files go to `DIR/{job}/{task}/{index}.{ext}`, where `{job}` is [`dir_name`] of the job id
//! (a folder no other id maps to) and `{task}` that of the task id. A file is written to
//! `{index}.{ext}.part` ([`part_path`]) and renamed when complete, so a file that exists under
//! its result name is whole (even when the URL's own extension is `.part`), and it is this
//! task's: a resumed run skips it and fetches only what is missing, while a job whose task
//! changed (a new journal over the same `DIR`, say) gets a folder of its own instead of taking
//! another task's file. At most [`MAX_IN_FLIGHT`] jobs download at once unless set otherwise
//! ([`RunOptions::max_downloads`](crate::run::RunOptions::max_downloads)).
//!
//! A result server that stops answering cannot hold a run: each file has a connect timeout,
//! an idle timeout (the longest wait for the response head or for the next bytes of the body)
//! and an overall cap ([`DownloadTimeouts`]: 10 s, 30 s and 10 minutes unless set). A file
//! that runs out of time is given up like any failed download: the job stays `succeeded`,
//! the journal and the output say which file is missing and why (`download_error`), and the
//! next run with `--download` fetches it.
//!
//! A result server's answer other than `200` is read by what can change it
//! ([`HttpStatus`]): `403`, `404` and `410` are what a result URL answers once it has expired
//! (KLING_API.md: after 30 days), and no later run can change that. But a URL within its
//! lifetime answers so too (a file not yet published, a CDN's or proxy's refusal), and
//! a later run may get it: only a job whose task ended at least [`URL_LIFETIME`] ago
//! ([`expired`]) and whose every missing file is answered so is recorded once, with a
//! `download_error` beginning with [`GONE`], and not fetched again (unless a run is told to,
//! `--refetch-gone`). Before that lifetime is over (or after, with `--refetch-gone`), the
//! run asks the task for its result URLs again and fetches them, [`MAX_REFRESHES`] times at
//! most (a signed link may expire sooner, a file be published late). `429`, `408` and `5xx`
//! are asked again within the run, at most [`MAX_TRIES`] times in all (after the answer's
//! `Retry-After`, up to 10 s, or 0.5 s doubled each time), within the file's overall cap;
//! still refused, the file is left for the next run, as is one answered with any other status.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::BodyExt as _;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::Connect;
use kling_tower::client::HttpsClient;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::error::DownloadError;

/// How many jobs download their result files at once by default: a resumed run of thousands
/// of jobs fetches them this many at a time, not all at once.
pub const MAX_IN_FLIGHT: usize = 8;

/// How many times one run asks for a file answered with a status that may change (`429`,
/// `408`, `5xx`): a result server that is down costs a few requests, not a run.
pub const MAX_TRIES: u32 = 3;

/// The wait before the second try of a file, doubled for each later one.
const RETRY_WAIT: Duration = Duration::from_millis(500);

/// How many times one run asks Kling again for a task's result URLs, and fetches them, when
/// every file missing was answered `403`, `404` or `410` ([`HttpStatus::is_final`]): a signed
/// link may expire before the 30 days, or a file be published a moment after its task
/// ends. A few queries a job, not one a try.
pub const MAX_REFRESHES: u32 = 2;

/// The wait before a task's result URLs are asked for again ([`MAX_REFRESHES`]), doubled
/// for each later time.
pub const REFRESH_WAIT: Duration = Duration::from_millis(500);

/// The longest wait a `Retry-After` may ask for before another try: the server's input.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// How the `download_error` of a job begins whose every missing file was refused for good
/// ([`HttpStatus::is_final`], past [`URL_LIFETIME`]): the run that meets it says so once, and
/// later runs do not fetch it again.
pub const GONE: &str = "result file gone";

/// How long Kling's result URLs last (KLING_API.md: 30 days after the task).
pub const URL_LIFETIME: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Whether the result URLs of a task whose end was noticed at `ended` (the journal's
/// [`succeeded_at`](crate::journal::Journal::succeeded_at)) have surely expired at `now`:
/// only then is a `403`, `404` or `410` final. Before, it may be a file not yet published or
/// a CDN's refusal, which a later run may get past. Not known when it ended: not expired.
pub fn expired(ended: Option<SystemTime>, now: SystemTime) -> bool {
    ended
        .and_then(|ended| ended.checked_add(URL_LIFETIME))
        .is_some_and(|end| now >= end)
}

/// A result server's answer other than `200 OK`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpStatus {
    status: StatusCode,
    retry_after: Option<Duration>,
}

impl HttpStatus {
    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Whether it is what a signed result URL answers once it has expired: `403`, `404` or
    /// `410`. Final only for a URL past its lifetime ([`expired`]): one within it answers so
    /// too before its file is published, or when a CDN refuses the request.
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_u16(), 403 | 404 | 410)
    }

    /// Whether another try within the run may be answered otherwise: `408`, `429`, `5xx`.
    pub fn is_transient(&self) -> bool {
        self.status == StatusCode::REQUEST_TIMEOUT
            || self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status.is_server_error()
    }
}

impl fmt::Display for HttpStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http {}", self.status.as_u16())
    }
}

impl std::error::Error for HttpStatus {}

/// How long one result file may take.
///
/// ```
/// use std::time::Duration;
/// use kling_batch::download::DownloadTimeouts;
///
/// let timeouts = DownloadTimeouts::default().idle(Duration::from_secs(5));
/// assert_eq!(timeouts.connect_timeout(), Duration::from_secs(10));
/// assert_eq!(timeouts.idle_timeout(), Duration::from_secs(5));
/// assert_eq!(timeouts.total_timeout(), Duration::from_secs(600));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DownloadTimeouts {
    connect: Duration,
    idle: Duration,
    total: Duration,
}

impl Default for DownloadTimeouts {
    /// Connect 10 s, idle 30 s, 10 minutes per file.
    fn default() -> Self {
        DownloadTimeouts {
            connect: Duration::from_secs(10),
            idle: Duration::from_secs(30),
            total: Duration::from_secs(600),
        }
    }
}

impl DownloadTimeouts {
    /// Sets the longest wait for the TCP connection to the result server.
    pub fn connect(mut self, timeout: Duration) -> Self {
        self.connect = timeout;
        self
    }

    /// Sets the longest wait for the response head (after connecting) and between two reads
    /// of the body.
    pub fn idle(mut self, timeout: Duration) -> Self {
        self.idle = timeout;
        self
    }

    /// Sets the longest one file may take, from connecting to the last byte.
    pub fn total(mut self, timeout: Duration) -> Self {
        self.total = timeout;
        self
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        self.idle
    }

    /// The overall cap per file.
    pub fn total_timeout(&self) -> Duration {
        self.total
    }
}

/// A download gave up waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimedOut {
    what: &'static str,
    after: Duration,
}

impl TimedOut {
    /// What it waited for: `connect`, `response`, `data` or `file`.
    pub fn what(&self) -> &str {
        self.what
    }
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.after.as_secs_f64();
        match self.what {
            "connect" => write!(f, "timed out: no connection within {secs}s"),
            "response" => write!(f, "timed out: no response within {secs}s"),
            "data" => write!(f, "timed out: no data for {secs}s"),
            _ => write!(f, "timed out: the file took more than {secs}s"),
        }
    }
}

impl std::error::Error for TimedOut {}

/// The client downloads go through: kling-tower's HTTPS client (rustls, ring, webpki roots;
/// plain HTTP too), with `connect` as its TCP connect timeout.
pub fn client(connect: Duration) -> Result<HttpsClient, DownloadError> {
    kling_tower::client::https_client_with_connect_timeout(connect)
        .map_err(|e| DownloadError::new("tls", e))
}

/// What [`fetch_all`] saved, and why anything is missing.
#[derive(Debug)]
#[non_exhaustive]
pub struct Fetched {
    /// The paths of the job's files on disk, in URL order (a missing one left out).
    pub files: Vec<String>,
    /// The first failure, when a file is missing: one that a later run may get past when
    /// there is one, else the first refused for good.
    pub error: Option<DownloadError>,
    /// Whether every missing file was answered as an expired URL answers
    /// ([`HttpStatus::is_final`]): gone for good when the task ended at least
    /// [`URL_LIFETIME`] ago ([`expired`]), which the caller knows; else a later run may get it.
    pub gone: bool,
}

/// The file name of result `index` of `url`: the index and the URL's extension.
pub fn file_name(index: usize, url: &str) -> String {
    let path = url
        .parse::<Uri>()
        .map(|u| u.path().to_owned())
        .unwrap_or_default();
    let ext = Path::new(&path)
        .extension()
        .and_then(|e| e.to_str())
        .filter(|e| !e.is_empty() && e.len() <= 8 && e.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or("bin");
    format!("{index}.{ext}")
}

/// Where the file at `path` is written until it is whole: its name and `.part` (`0.mp4` →
/// `0.mp4.part`). A result file's name ([`file_name`]) has one dot, so this is never one,
/// not even for a URL whose own extension is `.part` (`0.part` → `0.part.part`): a file that
/// exists under a result's name is always whole.
pub fn part_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    path.with_file_name(name)
}

/// A job or task id as a folder name that no other id maps to, on case-sensitive and
/// case-insensitive file systems alike.
///
/// An id of lowercase ASCII letters, digits, `-`, `_` and `.` (not all dots, not ending with a
/// dot, not a Windows device name such as `con`) is its own name. Any other id is cleaned
/// (every other character becomes `_`) and gets `~` and 16 hex digits of SHA-256 over the raw
/// id: `a b` → `a_b~…`, `Cat` → `Cat~…`. A name kept whole has no `~` and no capital, so it
/// never equals a hashed one, not even ignoring case.
///
/// ```
/// use kling_batch::download::dir_name;
///
/// assert_eq!(dir_name("job-1"), "job-1");
/// assert_ne!(dir_name("a b"), dir_name("a_b"));
/// assert!(dir_name("a b").starts_with("a_b~c868"), "the crate README's example");
/// assert_ne!(dir_name("Cat").to_lowercase(), dir_name("cat"));
/// ```
pub fn dir_name(id: &str) -> String {
    let plain = !id.is_empty()
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
        && !id.ends_with('.')
        && !is_device_name(id);
    if plain {
        return id.to_owned();
    }
    let mut name: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.chars().all(|c| c == '.') || is_device_name(&name) {
        name.insert_str(0, "job");
    }
    let digest = Sha256::digest(id.as_bytes());
    name.push('~');
    for byte in &digest[..8] {
        name.push_str(&format!("{byte:02x}"));
    }
    name
}

/// Whether a name is one Windows keeps for a device (`con`, `nul`, `com1`, … in any case,
/// with any extension).
fn is_device_name(name: &str) -> bool {
    let stem = name
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let stem = stem.as_str();
    matches!(stem, "con" | "prn" | "aux" | "nul")
        || (stem.len() == 4
            && (stem.starts_with("com") || stem.starts_with("lpt"))
            && stem.as_bytes()[3].is_ascii_digit())
}

/// The folder of a task's files: `dir/{job}/{task}` (each through [`dir_name`]).
pub fn task_dir(dir: &Path, job_id: &str, task_id: &str) -> PathBuf {
    dir.join(dir_name(job_id)).join(dir_name(task_id))
}

/// Downloads every URL of a job's task `task_id` that is not on disk yet (in
/// [`task_dir`]), each within `timeouts`; a failed file does not stop the others. A file the
/// journal recorded for the task (`recorded`) that is still on disk is kept where it is, by
/// its name (`{index}.{ext}`): an older version saved files in `dir/{job}/`, without the
/// task's folder.
pub async fn fetch_all<C, B>(
    client: &Client<C, B>,
    dir: &Path,
    job_id: &str,
    task_id: &str,
    urls: &[String],
    recorded: &[String],
    timeouts: DownloadTimeouts,
) -> Fetched
where
    C: Connect + Clone + Send + Sync + 'static,
    B: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let folder = task_dir(dir, job_id, task_id);
    let mut fetched = Fetched {
        files: Vec::with_capacity(urls.len()),
        error: None,
        gone: false,
    };
    let mut gone = None;
    if let Err(e) = tokio::fs::create_dir_all(&folder).await {
        fetched.error = Some(DownloadError::new(folder.display().to_string(), e));
        return fetched;
    }
    for (index, url) in urls.iter().enumerate() {
        let name = file_name(index, url);
        let mut kept = None;
        for path in recorded {
            let path = Path::new(path);
            // Kept where it is only under this run's DIR (a rerun may name another; an older
            // version's layout under it is kept).
            if path.file_name().is_some_and(|f| *f == *name.as_str())
                && path.starts_with(dir)
                && tokio::fs::metadata(path).await.is_ok()
            {
                kept = Some(path.display().to_string());
                break;
            }
        }
        if let Some(kept) = kept {
            fetched.files.push(kept);
            continue;
        }
        let path = folder.join(name);
        if tokio::fs::metadata(&path).await.is_err() {
            let tries = fetch_tries(client, url, &path, timeouts);
            let result = match tokio::time::timeout(timeouts.total, tries).await {
                Ok(result) => result,
                Err(_) => Err(DownloadError::new(
                    url.clone(),
                    TimedOut {
                        what: "file",
                        after: timeouts.total,
                    },
                )),
            };
            if let Err(e) = result {
                // A `.part` left behind is overwritten by the next attempt; remove it now.
                let _ = tokio::fs::remove_file(part_path(&path)).await;
                if e.is_gone() {
                    gone.get_or_insert(e);
                } else {
                    fetched.error.get_or_insert(e);
                }
                continue;
            }
        }
        fetched.files.push(path.display().to_string());
    }
    if fetched.error.is_none() && gone.is_some() {
        fetched.error = gone;
        fetched.gone = true;
    }
    fetched
}

/// [`fetch`], asked again after an answer that may change ([`HttpStatus::is_transient`]),
/// [`MAX_TRIES`] times at most.
async fn fetch_tries<C, B>(
    client: &Client<C, B>,
    url: &str,
    path: &PathBuf,
    timeouts: DownloadTimeouts,
) -> Result<(), DownloadError>
where
    C: Connect + Clone + Send + Sync + 'static,
    B: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut wait = RETRY_WAIT;
    let mut tries = 1;
    loop {
        let error = match fetch(client, url, path, timeouts).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        let Some(status) = error.http_status().filter(|s| s.is_transient()) else {
            return Err(error);
        };
        if tries >= MAX_TRIES {
            return Err(error);
        }
        let pause = status.retry_after.unwrap_or(wait).min(MAX_RETRY_WAIT);
        tokio::time::sleep(pause).await;
        wait = wait.saturating_mul(2);
        tries += 1;
    }
}

/// A `Retry-After` of delta seconds (a date is not read: the wait falls back to the default).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

async fn fetch<C, B>(
    client: &Client<C, B>,
    url: &str,
    path: &PathBuf,
    timeouts: DownloadTimeouts,
) -> Result<(), DownloadError>
where
    C: Connect + Clone + Send + Sync + 'static,
    B: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let fail = |e: Box<dyn std::error::Error + Send + Sync>| DownloadError::new(url.to_owned(), e);
    let timed_out = |what, after| fail(Box::new(TimedOut { what, after }));
    let request = Request::get(url)
        .body(B::from(Bytes::new()))
        .map_err(|e| fail(e.into()))?;
    // Connecting has its own timeout in the client's connector; the TLS handshake and the
    // response head must then come within the idle timeout.
    let head_wait = timeouts.connect.saturating_add(timeouts.idle);
    let response = tokio::time::timeout(head_wait, client.request(request))
        .await
        .map_err(|_| timed_out("response", head_wait))?
        .map_err(|e| {
            if is_connect_timeout(&e) {
                timed_out("connect", timeouts.connect)
            } else {
                fail(e.into())
            }
        })?;
    if response.status() != StatusCode::OK {
        return Err(fail(Box::new(HttpStatus {
            status: response.status(),
            retry_after: retry_after(response.headers()),
        })));
    }
    let part = part_path(path);
    let mut file = tokio::fs::File::create(&part)
        .await
        .map_err(|e| DownloadError::new(part.display().to_string(), e))?;
    let mut body = response.into_body();
    loop {
        let frame = tokio::time::timeout(timeouts.idle, body.frame())
            .await
            .map_err(|_| timed_out("data", timeouts.idle))?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| fail(e.into()))?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data)
                .await
                .map_err(|e| DownloadError::new(part.display().to_string(), e))?;
        }
    }
    // `flush` first: it waits for the last write, which tokio's `File` runs in the
    // background, and returns its error (the disk full, a quota, `EFBIG`). `sync_all` waits
    // for it too but keeps the error for a later call, so a file cut short was renamed and
    // recorded as whole.
    file.flush()
        .await
        .map_err(|e| DownloadError::new(part.display().to_string(), e))?;
    file.sync_all()
        .await
        .map_err(|e| DownloadError::new(part.display().to_string(), e))?;
    drop(file);
    tokio::fs::rename(&part, path)
        .await
        .map_err(|e| DownloadError::new(path.display().to_string(), e))?;
    Ok(())
}

/// Whether a client error is the connector's connect timeout.
fn is_connect_timeout(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_and_keep_the_extension() {
        assert_eq!(file_name(0, "http://h/outputs/1/0.mp4"), "0.mp4");
        assert_eq!(file_name(2, "http://h/x?sig=1"), "2.bin");
        assert_eq!(file_name(1, "http://h/a.p/ng"), "1.bin");
        assert!(dir_name("a/b c").starts_with("a_b_c~"));
        assert!(dir_name("..").starts_with("job..~"));
        assert_eq!(dir_name("shot-1.v2_final"), "shot-1.v2_final");
        assert_eq!(dir_name("860000000000000001"), "860000000000000001");
    }

    /// The file being written is never named as a result file, of its own URL or another's.
    #[test]
    fn a_file_being_written_never_has_a_result_files_name() {
        let urls = [
            "http://h/x.mp4",
            "http://h/x.mp4.part",
            "http://h/video.part",
            "http://h/part",
            "http://h/x",
        ];
        let finals: Vec<String> = (0..3)
            .flat_map(|i| urls.iter().map(move |u| file_name(i, u)))
            .collect();
        for name in &finals {
            let part = part_path(&Path::new("d").join(name));
            let part = part.file_name().unwrap().to_str().unwrap();
            assert!(
                !finals.iter().any(|f| f == part),
                "{name} is written as {part}"
            );
        }
        assert_eq!(part_path(Path::new("d/0.part")), Path::new("d/0.part.part"));
        assert_eq!(part_path(Path::new("d/1.mp4")), Path::new("d/1.mp4.part"));
    }

    #[test]
    fn no_two_ids_share_a_folder_even_ignoring_case() {
        let ids = [
            "a b", "a_b", "a/b", "a?b", "A_b", "a_B", "cat", "Cat", "CAT", "a.", "a", "..", ".",
            "con", "con.txt", "CON.txt", "com1", "Lpt1", "é", "e", "_",
        ];
        let names: std::collections::HashSet<String> =
            ids.iter().map(|id| dir_name(id).to_lowercase()).collect();
        assert_eq!(names.len(), ids.len(), "{names:?}");
        for id in ids {
            let name = dir_name(id);
            assert!(!matches!(name.as_str(), "." | ".."), "{id}: {name}");
            assert!(
                !name.ends_with('.') && !is_device_name(&name),
                "{id}: {name}"
            );
        }
    }
}
