//! Jobs: one JSON object per line of a JSONL file.
//!
//! Each line is a create body (`prompt` and any other field Kling takes) plus two fields of
//! the tool's own, which are taken out of the body:
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `id` | `auto-` and a hash of the job | its id (a string or a number), unique in the file |
//! | `endpoint` | `/v1/videos/text2video` | the create path, legacy or new-style |
//!
//! The create path is a legacy one (`/v1/images/generations`, …) or a new-style
//! `/{product}/{model}` (`/text-to-video/kling-3.0`).
//!
//! `external_task_id` / `external_id` are set by the tool (one deterministic id per job, see
//! [`Journal::external_id_for`](crate::journal::Journal::external_id_for)); a line that sets
//! them is refused. Blank lines and lines starting with `#` are skipped, and so is a UTF-8
//! byte order mark at the start of the file or of a line (where files were joined), and a
//! file saved as UTF-16 is refused as such. The file is read as bytes
//! ([`parse_jobs_bytes`]): a line that is not valid UTF-8 is reported with its number like any
//! malformed line, and the others still run.
//!
//! # Default ids
//!
//! The journal keeps each job's state under its id, so an id must name the same job from one
//! run to the next. A job without an `id` gets one from its content ([`default_id`]): `auto-`
//! and 12 hex digits of SHA-256 over its endpoint and its body in canonical JSON (keys sorted,
//! no spaces), so adding, removing or reordering other lines, or reordering the keys of its
//! own line, never changes it. Identical jobs are told apart in order of appearance: the
//! second gets `-2`, the third `-3`, and so on. Changing a job's body or endpoint gives it a
//! new id, that is a new job; a job with an explicit `id` whose body changed is refused on
//! resume (see [`Journal::register`](crate::journal::Journal::register)).
//!
//! ```
//! use kling_batch::jobs::parse_jobs;
//!
//! let text = "{\"prompt\":\"a cat\"}\nnot json\n{\"id\":\"dog\",\"prompt\":\"a dog\",\"endpoint\":\"/text-to-video/kling-3.0\"}\n";
//! let (jobs, errors) = parse_jobs(text);
//! assert_eq!(jobs.len(), 2);
//! assert!(jobs[0].id.starts_with("auto-"));
//! // The same job on another line, keys in another order: the same id.
//! let (moved, _) = parse_jobs("# a comment\n\n{\"prompt\":\"a cat\",\"endpoint\":\"/v1/videos/text2video\"}\n");
//! assert_eq!(moved[0].id, jobs[0].id);
//! assert_eq!(jobs[1].pool().to_string(), "video:kling-3.0");
//! assert_eq!(errors[0].line(), 2);
//! ```

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt::Write as _;

use http::{Method, Uri};
use kling_core::{ApiGeneration, Pool, Recognized};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::JobError;

/// The create path of a job without an `endpoint`.
pub const DEFAULT_ENDPOINT: &str = "/v1/videos/text2video";

/// The longest job id accepted.
pub const MAX_ID_LEN: usize = 128;

/// The prefix of the ids [`default_id`] makes.
pub const DEFAULT_ID_PREFIX: &str = "auto-";

/// One generation job.
///
/// Its create body is held as JSON text, the line it came from ([`body`](Self::body) reads
/// it): a parsed body (`serde_json::Value`s) takes about 7 times the line's bytes, and a run
/// holds every job of its file.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Job {
    /// The job's id, unique in its file.
    pub id: String,
    /// The 1-based line it came from.
    pub line: usize,
    /// The create path (`/v1/videos/text2video`, `/text-to-video/kling-3.0`, …).
    pub endpoint: String,
    /// The body's JSON text: the jobs file's line (with its `id` and `endpoint`, taken out
    /// when read), or the body given to [`Job::new`].
    source: Box<str>,
    /// Whether `source` is a line of a jobs file, whose `id` and `endpoint` are the tool's.
    from_line: bool,
    /// What the endpoint and body say of the create (kling-core's [`Recognized`], kept in
    /// part: the rest of it is empty for a job's create).
    pool: Pool,
    weight: u32,
    generation: ApiGeneration,
    default_id: bool,
}

impl Job {
    /// A job from its parts; the endpoint must be a create path. The body is kept as its
    /// JSON text ([`body`](Self::body) reads it).
    #[expect(
        clippy::needless_pass_by_value,
        reason = "the body was the job's own before it was kept as text; the signature stays"
    )]
    pub fn new(
        id: impl Into<String>,
        line: usize,
        endpoint: impl Into<String>,
        body: Map<String, Value>,
    ) -> Result<Job, JobError> {
        let source = serde_json::to_string(&body).unwrap_or_default();
        Job::with_source(
            id.into(),
            line,
            endpoint.into(),
            &body,
            source.into(),
            false,
        )
    }

    /// A job whose `body` was read from `source` (a line of a jobs file when `from_line`).
    fn with_source(
        id: String,
        line: usize,
        endpoint: String,
        body: &Map<String, Value>,
        source: Box<str>,
        from_line: bool,
    ) -> Result<Job, JobError> {
        if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
            return Err(JobError::new(
                line,
                format!(
                    "`id` must be 1 to {MAX_ID_LEN} bytes of printable characters (UTF-8: a \
                     CJK character takes 3), not {} bytes",
                    id.len()
                ),
            ));
        }
        let uri: Uri = endpoint
            .parse()
            .map_err(|_| JobError::new(line, format!("`endpoint` `{endpoint}` is not a path")))?;
        // A `#fragment` is dropped from the request's URI: the create would go to the path
        // before it, and a lookup of `{endpoint}/{id}` to the bare create path, Kling's list
        // of the account's tasks, whose first task would pass for the job's.
        if uri.scheme().is_some()
            || !endpoint.starts_with('/')
            || uri.query().is_some()
            || endpoint.contains('#')
        {
            return Err(JobError::new(
                line,
                format!(
                    "`endpoint` `{endpoint}` must be a path such as {DEFAULT_ENDPOINT} \
                     (no `?query`, no `#fragment`)"
                ),
            ));
        }
        // Paths that a reading of them (kling-core's, a server's) takes as a create but whose
        // text is not one: an empty or dot segment (also written `%2e`, which a server that
        // normalises the path decodes), a trailing `/`, `;` parameters. Kling
        // answers such a create with an error (the mock: 1202), after the job was sent once
        // and looked up once; refused here, by line.
        let path = uri.path();
        let segments = path.split('/').skip(1);
        let is_dots = |segment: &str| {
            let decoded = segment.replace("%2e", ".").replace("%2E", ".");
            decoded == "." || decoded == ".."
        };
        if path.contains(';')
            || segments
                .into_iter()
                .any(|segment| segment.is_empty() || is_dots(segment))
        {
            return Err(JobError::new(
                line,
                format!(
                    "`endpoint` `{endpoint}` must be a path such as {DEFAULT_ENDPOINT} \
                     (no empty or dot segment, no trailing `/`, no `;`)"
                ),
            ));
        }
        let raw = serde_json::to_vec(body).unwrap_or_default();
        let recognized = Recognized::from_parts(&Method::POST, &uri, &raw);
        let is_create = recognized.is_create();
        let pool = match recognized.pool {
            Some(pool) if is_create => pool,
            _ => {
                return Err(JobError::new(
                    line,
                    format!("`endpoint` `{endpoint}` is not a Kling create path"),
                ));
            }
        };
        for reserved in ["external_task_id", "external_id"] {
            if body.contains_key(reserved) {
                return Err(JobError::new(
                    line,
                    format!("`{reserved}` is set by kling-batch (one per job); remove it"),
                ));
            }
        }
        Ok(Job {
            id,
            line,
            endpoint,
            source,
            from_line,
            pool,
            weight: recognized.weight,
            generation: recognized.generation.unwrap_or(ApiGeneration::Legacy),
            default_id: false,
        })
    }

    /// The create body, without the tool's own fields (`id`, `endpoint`): parsed anew from
    /// the text the job holds at each call, the same map each time.
    pub fn body(&self) -> Map<String, Value> {
        // Never fails: the text was read (or written) as such a map when the job was made.
        let mut body: Map<String, Value> = serde_json::from_str(&self.source).unwrap_or_default();
        if self.from_line {
            body.remove("id");
            body.remove("endpoint");
        }
        body
    }

    /// Whether the id was made by [`default_id`] (the line had no `id`).
    pub fn has_default_id(&self) -> bool {
        self.default_id
    }

    /// Whether `endpoint` and `body` are this job's (the key order of objects aside).
    pub fn same_content(&self, endpoint: &str, body: &Map<String, Value>) -> bool {
        self.endpoint == endpoint && canonical_json(&self.body()) == canonical_json(body)
    }

    /// The pool the job's task takes its slots from.
    pub fn pool(&self) -> Pool {
        self.pool.clone()
    }

    /// Slots the task takes (`n` for images).
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Which API generation the endpoint belongs to.
    pub fn generation(&self) -> ApiGeneration {
        self.generation
    }

    /// The create body with the job's external id (and callback URL, if any) set, in the
    /// field names of the endpoint's generation.
    pub fn create_body(&self, external_id: &str, callback_url: Option<&str>) -> Vec<u8> {
        let mut body = self.body();
        match self.generation() {
            ApiGeneration::New => {
                body.insert("external_id".into(), Value::String(external_id.into()));
                if let Some(url) = callback_url {
                    let options = body
                        .entry("options")
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Value::Object(options) = options {
                        options.insert("callback_url".into(), Value::String(url.into()));
                    }
                }
            }
            _ => {
                body.insert("external_task_id".into(), Value::String(external_id.into()));
                if let Some(url) = callback_url {
                    body.insert("callback_url".into(), Value::String(url.into()));
                }
            }
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// The UTF-8 byte order mark some editors put at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Parses a JSONL text: the jobs of its good lines, and one error per bad line (with its
/// line number), in file order. A line without `id` gets [`default_id`], with `-2`, `-3`, …
/// for the second, third, … identical job. See [`parse_jobs_bytes`].
pub fn parse_jobs(text: &str) -> (Vec<Job>, Vec<JobError>) {
    parse_jobs_bytes(text.as_bytes())
}

/// [`parse_jobs`] of a file's bytes: a UTF-8 byte order mark at the start of the file or of a
/// line (files joined with `cat`) is skipped, and a line that is not valid UTF-8 is one more
/// bad line, reported with its number (lines end at `\n`, a `\r` before it is dropped). A
/// file that starts with a UTF-16 byte order mark is one error, on line 1, and no job.
///
/// ```
/// use kling_batch::jobs::parse_jobs_bytes;
///
/// let (jobs, errors) = parse_jobs_bytes(b"\xEF\xBB\xBF{\"prompt\":\"a cat\"}\r\n{\"prompt\":\"caf\xE9\"}\n");
/// assert_eq!(jobs.len(), 1);
/// assert_eq!(errors[0].line(), 2);
/// assert!(errors[0].to_string().contains("not valid UTF-8"));
/// ```
pub fn parse_jobs_bytes(bytes: &[u8]) -> (Vec<Job>, Vec<JobError>) {
    // A file saved as UTF-16 (PowerShell 5's `>` and `Out-File` write it so) has no line
    // this reads: one error says why, rather than one per line that looks right in an editor.
    if bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF") {
        return (
            Vec::new(),
            vec![JobError::new(
                1,
                "the file is UTF-16 (it starts with a UTF-16 byte order mark), not UTF-8: save \
                 it as UTF-8",
            )],
        );
    }
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    // Each id, with the line that holds it.
    let mut ids = HashMap::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        // A byte order mark starts the file, or a line where files were joined (`cat a.jsonl
        // b.jsonl`, each saved with one): never JSON, and invisible in an editor.
        let (raw, bom) = match raw.strip_prefix(BOM) {
            Some(rest) => (rest, BOM.len()),
            None => (raw, 0),
        };
        let trimmed = raw.trim_ascii();
        if trimmed.is_empty() || trimmed.starts_with(b"#") {
            continue;
        }
        let trimmed = match std::str::from_utf8(trimmed) {
            // Other Unicode white space may still surround a comment.
            Ok(text) if text.trim().is_empty() || text.trim().starts_with('#') => continue,
            Ok(text) => text.trim(),
            Err(e) => {
                let at = bom + raw.len() - raw.trim_ascii_start().len() + e.valid_up_to() + 1;
                errors.push(JobError::new(
                    line,
                    format!("not valid UTF-8 (byte {at} of the line)"),
                ));
                continue;
            }
        };
        let parsed = parse_line(trimmed, line).and_then(|(id, endpoint, body)| match id {
            Some(id) => Job::with_source(id, line, endpoint, &body, trimmed.into(), true),
            None => {
                let base = default_id(&endpoint, &body);
                let count = seen.entry(base.clone()).or_default();
                // The n-th identical job gets `-n`; an explicit id that holds the name
                // already (unlikely, but allowed) pushes it to the next free suffix.
                let id = loop {
                    *count += 1;
                    let id = if *count == 1 {
                        base.clone()
                    } else {
                        format!("{base}-{count}")
                    };
                    if !ids.contains_key(&id) {
                        break id;
                    }
                };
                let mut job = Job::with_source(id, line, endpoint, &body, trimmed.into(), true)?;
                job.default_id = true;
                Ok(job)
            }
        });
        match parsed {
            Ok(job) => match ids.entry(job.id.clone()) {
                Entry::Vacant(vacant) => {
                    vacant.insert(line);
                    jobs.push(job);
                }
                Entry::Occupied(earlier) => errors.push(JobError::new(
                    line,
                    format!(
                        "job id `{}` is used by an earlier line (line {})",
                        job.id,
                        earlier.get()
                    ),
                )),
            },
            Err(e) => errors.push(e),
        }
    }
    (jobs, errors)
}

/// The id of a job without one: [`DEFAULT_ID_PREFIX`] and 12 hex digits of SHA-256 over the
/// endpoint, a newline and the body in canonical JSON. It depends on nothing but the job
/// itself (not its line, not its neighbours, not the order of its keys).
///
/// ```
/// use kling_batch::jobs::default_id;
///
/// let a: serde_json::Map<_, _> = serde_json::from_str(r#"{"prompt":"a cat","duration":"5"}"#)?;
/// let b: serde_json::Map<_, _> = serde_json::from_str(r#"{ "duration": "5", "prompt": "a cat" }"#)?;
/// assert_eq!(default_id("/v1/videos/text2video", &a), default_id("/v1/videos/text2video", &b));
/// assert_ne!(default_id("/v1/videos/text2video", &a), default_id("/text-to-video/kling-3.0", &a));
/// # Ok::<(), serde_json::Error>(())
/// ```
pub fn default_id(endpoint: &str, body: &Map<String, Value>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(endpoint.as_bytes());
    hasher.update(b"\n");
    hasher.update(canonical_json(body).as_bytes());
    let digest = hasher.finalize();
    let mut id = String::from(DEFAULT_ID_PREFIX);
    for b in &digest[..6] {
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// A body as canonical JSON: object keys sorted, no whitespace.
fn canonical_json(body: &Map<String, Value>) -> String {
    fn write_value(out: &mut String, value: &Value) {
        match value {
            Value::Object(map) => write_object(out, map),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_value(out, item);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    fn write_object(out: &mut String, map: &Map<String, Value>) {
        let mut entries: Vec<(&String, &Value)> = map.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        out.push('{');
        for (i, (key, value)) in entries.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&Value::String(key.clone()).to_string());
            out.push(':');
            write_value(out, value);
        }
        out.push('}');
    }
    let mut out = String::new();
    write_object(&mut out, body);
    out
}

type ParsedLine = (Option<String>, String, Map<String, Value>);

fn parse_line(text: &str, line: usize) -> Result<ParsedLine, JobError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| JobError::new(line, format!("not valid JSON: {e}")))?;
    let Value::Object(mut body) = value else {
        return Err(JobError::new(line, "not a JSON object"));
    };
    let id = match body.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(JobError::new(line, "`id` must be a string or a number")),
    };
    let endpoint = match body.remove("endpoint") {
        None | Some(Value::Null) => DEFAULT_ENDPOINT.to_owned(),
        Some(Value::String(s)) => s,
        Some(_) => return Err(JobError::new(line, "`endpoint` must be a string")),
    };
    Ok((id, endpoint, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_reported_with_their_numbers() {
        let text = "\n{\"prompt\":\"a\"}\n[1]\n{\"id\":\"x\",\"endpoint\":\"/nope\"}\n# comment\n{\"id\":\"x\"}\n{\"id\":\"x\"}\n{\"external_task_id\":\"e\"}\n";
        let (jobs, errors) = parse_jobs(text);
        assert_eq!(jobs.len(), 2);
        let lines: Vec<usize> = errors.iter().map(JobError::line).collect();
        assert_eq!(lines, vec![3, 4, 7, 8]);
        assert!(errors[1].to_string().contains("/nope"), "{}", errors[1]);
        assert!(
            errors[2].to_string().contains("earlier line (line 6)"),
            "names the line that holds the id: {}",
            errors[2]
        );
    }

    /// An endpoint read as a create path but not written as one (a trailing `/`, an empty or
    /// dot segment, `;` parameters) is refused by line: Kling answers such a create with an
    /// error, after the job was sent and looked up.
    #[test]
    fn an_endpoint_that_is_no_plain_create_path_is_refused_naming_the_line() {
        let odd = [
            "/v1/videos/text2video/",
            "/v1//videos/text2video",
            "/v1/videos/./text2video",
            "/v1/x/../videos/text2video",
            "/v1/videos/text2video;a=b",
            "/text-to-video/kling-3.0/",
        ];
        for endpoint in odd {
            let text = format!("{{\"id\":\"a\",\"prompt\":\"x\",\"endpoint\":\"{endpoint}\"}}\n");
            let (jobs, errors) = parse_jobs(&text);
            assert!(jobs.is_empty(), "{endpoint}");
            assert_eq!(errors.len(), 1, "{endpoint}");
            assert_eq!(errors[0].line(), 1);
            assert!(errors[0].to_string().contains(endpoint), "{}", errors[0]);
        }
        for plain in ["/v1/videos/text2video", "/text-to-video/kling-3.0"] {
            let text = format!("{{\"id\":\"a\",\"prompt\":\"x\",\"endpoint\":\"{plain}\"}}\n");
            let (jobs, errors) = parse_jobs(&text);
            assert_eq!((jobs.len(), errors.len()), (1, 0), "{plain}: {errors:?}");
        }
    }

    /// A dot segment written percent-encoded (`%2e%2e`, `.%2E`) is one to a server that
    /// normalises the path (RFC 3986 decodes `%2E` to `.`): kling-core read
    /// `/v1/videos/%2e%2e/v1/videos/text2video` as a create, and the job was sent, answered
    /// `1202` (the mock) and looked up before it failed.
    #[test]
    fn an_endpoint_with_an_encoded_dot_segment_is_refused_naming_the_line() {
        for endpoint in [
            "/v1/videos/%2e%2e/v1/videos/text2video",
            "/v1/x/%2E%2E/videos/text2video",
            "/v1/x/.%2e/videos/text2video",
            "/v1/videos/%2e/text2video",
        ] {
            let text = format!("{{\"id\":\"a\",\"prompt\":\"x\",\"endpoint\":\"{endpoint}\"}}\n");
            let (jobs, errors) = parse_jobs(&text);
            assert!(jobs.is_empty(), "{endpoint}: {:?}", jobs[0].pool());
            assert_eq!(errors[0].line(), 1);
            assert!(errors[0].to_string().contains(endpoint), "{}", errors[0]);
        }
        // An escape that is no dot is still the server's to read.
        let text = "{\"id\":\"a\",\"prompt\":\"x\",\"endpoint\":\"/text-to-video/kling%2D3.0\"}\n";
        let (jobs, errors) = parse_jobs(text);
        assert_eq!((jobs.len(), errors.len()), (1, 0), "{errors:?}");
    }

    /// An endpoint with a `#fragment` is refused by line: the fragment never reaches the
    /// server, so the job's lookup would ask for the create path itself (the list of the
    /// account's tasks) and could take another job's task for its own.
    #[test]
    fn an_endpoint_with_a_fragment_or_a_query_is_refused_naming_the_line() {
        let text = "{\"id\":\"a\",\"prompt\":\"x\"}\n{\"id\":\"b\",\"prompt\":\"x\",\"endpoint\":\"/v1/videos/text2video#take-2\"}\n{\"id\":\"c\",\"prompt\":\"x\",\"endpoint\":\"/text-to-video/kling-3.0#\"}\n{\"id\":\"d\",\"prompt\":\"x\",\"endpoint\":\"/v1/videos/text2video?a=1\"}\n";
        let (jobs, errors) = parse_jobs(text);
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["a"]);
        let lines: Vec<usize> = errors.iter().map(JobError::line).collect();
        assert_eq!(lines, [2, 3, 4]);
        assert!(
            errors[0]
                .to_string()
                .contains("`endpoint` `/v1/videos/text2video#take-2`"),
            "{}",
            errors[0]
        );
        assert!(
            errors[0].to_string().contains("no `#fragment`"),
            "{}",
            errors[0]
        );
    }

    /// The id's bound is in bytes, and the error says so: 50 CJK characters are 150 bytes,
    /// refused, where the message used to speak of "128 printable characters".
    #[test]
    fn an_id_over_the_bound_is_refused_in_bytes_saying_how_many() {
        let id = "镜".repeat(50);
        let text = format!("{{\"id\":\"{id}\",\"prompt\":\"x\"}}\n");
        let (jobs, errors) = parse_jobs(&text);
        assert!(jobs.is_empty());
        let message = errors[0].to_string();
        assert!(
            message.contains("128 bytes") && message.contains("not 150 bytes"),
            "{message}"
        );
        let (jobs, _) = parse_jobs(&format!(
            "{{\"id\":\"{}\",\"prompt\":\"x\"}}\n",
            "镜".repeat(42)
        ));
        assert_eq!(jobs.len(), 1, "126 bytes");
    }

    #[test]
    fn a_byte_order_mark_is_skipped_and_a_line_of_bad_utf8_is_reported_by_number() {
        let text = b"\xEF\xBB\xBF{\"id\":\"a\",\"prompt\":\"one\"}\n{\"id\":\"b\",\"prompt\":\"t\xFFwo\"}\r\n# caf\xE9\n{\"id\":\"c\",\"prompt\":\"three\"}\r\n";
        let (jobs, errors) = parse_jobs_bytes(text);
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(jobs[1].line, 4);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line(), 2);
        assert_eq!(
            errors[0].to_string(),
            "line 2: not valid UTF-8 (byte 22 of the line)"
        );
        // The same through `parse_jobs`: a BOM in a string is skipped too.
        let (jobs, errors) = parse_jobs("\u{feff}{\"prompt\":\"a\"}\n");
        assert_eq!((jobs.len(), errors.len()), (1, 0));
    }

    /// Files joined with `cat`, each saved with a byte order mark: the mark at the start of a
    /// later line was read as the line's first character, and the line, right in any editor,
    /// was skipped as "not valid JSON: expected value at line 1 column 1". A job on such a line
    /// runs, with the id it has in a file of its own; its UTF-8 errors count the mark's bytes.
    #[test]
    fn a_byte_order_mark_where_files_were_joined_is_skipped() {
        let text = b"\xEF\xBB\xBF{\"id\":\"a\",\"prompt\":\"one\"}\r\n\xEF\xBB\xBF{\"prompt\":\"two\"}\r\n\xEF\xBB\xBF# joined\n\xEF\xBB\xBF{\"prompt\":\"t\xFFree\"}\n";
        let (jobs, errors) = parse_jobs_bytes(text);
        assert_eq!(jobs.len(), 2, "{errors:?}");
        assert_eq!((jobs[0].id.as_str(), jobs[1].line), ("a", 2));
        let (alone, _) = parse_jobs("{\"prompt\":\"two\"}\n");
        assert_eq!(jobs[1].id, alone[0].id);
        assert_eq!(jobs[1].body()["prompt"], "two");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].to_string(),
            "line 4: not valid UTF-8 (byte 16 of the line)"
        );
    }

    /// A file saved as UTF-16 (PowerShell 5's `>`) is one error saying so, not one
    /// "not valid JSON" per line of a file that looks right in an editor.
    #[test]
    fn a_file_saved_as_utf16_is_refused_as_such() {
        let lines = "{\"id\":\"a\",\"prompt\":\"x\"}\r\n{\"id\":\"b\",\"prompt\":\"y\"}\r\n";
        for bom in [[0xFF, 0xFE], [0xFE, 0xFF]] {
            let mut bytes = bom.to_vec();
            for unit in lines.encode_utf16() {
                let unit = if bom[0] == 0xFF {
                    unit.to_le_bytes()
                } else {
                    unit.to_be_bytes()
                };
                bytes.extend(unit);
            }
            let (jobs, errors) = parse_jobs_bytes(&bytes);
            assert!(jobs.is_empty());
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].line(), 1);
            assert!(
                errors[0].to_string().contains("the file is UTF-16"),
                "{}",
                errors[0]
            );
        }
    }

    #[test]
    fn create_bodies_carry_the_external_id_in_each_generation() {
        let (jobs, _) = parse_jobs(
            "{\"prompt\":\"a\"}\n{\"prompt\":\"b\",\"endpoint\":\"/text-to-video/kling-3.0\"}\n",
        );
        let legacy: Value =
            serde_json::from_slice(&jobs[0].create_body("e1", Some("http://cb"))).unwrap();
        assert_eq!(legacy["external_task_id"], "e1");
        assert_eq!(legacy["callback_url"], "http://cb");
        let new: Value =
            serde_json::from_slice(&jobs[1].create_body("e2", Some("http://cb"))).unwrap();
        assert_eq!(new["external_id"], "e2");
        assert_eq!(new["options"]["callback_url"], "http://cb");
        assert_eq!(jobs[1].generation(), ApiGeneration::New);
    }

    /// The body is held as the line's text and read anew, and reads as the parsed line did:
    /// the same map (duplicate keys, numbers, escapes, nested objects as `serde_json` reads
    /// them, the tool's `id` and `endpoint` taken out) and the same create bytes. A body given
    /// to [`Job::new`] keeps every key it has.
    #[test]
    fn a_body_kept_as_text_reads_and_is_sent_as_the_parsed_line() {
        let lines = [
            r#"{"id":"a","prompt":"a cat","duration":"5"}"#,
            r#"{"prompt":"caf\u00e9 \"x\"","cfg_scale":0.1,"n":3,"endpoint":"/v1/images/generations"}"#,
            r#"{ "prompt" : "dup", "prompt":"last", "camera_control":{"type":"simple","config":{"zoom":-2.5e0}}, "id": 7 }"#,
            r#"{"prompt":"new","endpoint":"/text-to-video/kling-3.0","options":{"x":[1,2.50,null,true]}}"#,
        ];
        let (jobs, errors) = parse_jobs(&lines.join("\n"));
        assert!(errors.is_empty(), "{errors:?}");
        for (job, line) in jobs.iter().zip(lines) {
            let mut parsed: Map<String, Value> = serde_json::from_str(line).unwrap();
            parsed.remove("id");
            parsed.remove("endpoint");
            assert_eq!(job.body(), parsed, "{line}");
            assert!(job.same_content(&job.endpoint, &parsed));
            // What the create sent when the job held the parsed map.
            let mut sent = parsed.clone();
            let own_id = match job.generation() {
                ApiGeneration::New => "external_id",
                _ => "external_task_id",
            };
            sent.insert(own_id.into(), Value::String("e1".into()));
            assert_eq!(
                job.create_body("e1", None),
                serde_json::to_vec(&sent).unwrap(),
                "{line}"
            );
        }
        assert_eq!(jobs[1].weight(), 3);
        assert_eq!(jobs[2].id, "7");
        assert_eq!(jobs[2].body()["prompt"], "last");
        let mut body = Map::new();
        body.insert("prompt".into(), Value::String("p".into()));
        body.insert(
            "endpoint".into(),
            Value::String("a field of the body".into()),
        );
        let job = Job::new("j", 1, DEFAULT_ENDPOINT, body.clone()).unwrap();
        assert_eq!(job.body(), body);
    }

    fn ids_by_prompt(text: &str) -> Vec<(String, String)> {
        let (jobs, errors) = parse_jobs(text);
        assert!(errors.is_empty(), "{errors:?}");
        jobs.into_iter()
            .map(|j| (j.body()["prompt"].as_str().unwrap().to_owned(), j.id))
            .collect()
    }

    #[test]
    fn default_ids_do_not_move_when_other_lines_are_added_removed_or_reordered() {
        let before = ids_by_prompt("{\"prompt\":\"a\"}\n{\"prompt\":\"b\"}\n{\"prompt\":\"c\"}\n");
        let id = |list: &[(String, String)], prompt: &str| {
            list.iter().find(|(p, _)| p == prompt).unwrap().1.clone()
        };
        // A comment and a blank line on top, a line removed, the rest reordered, keys moved.
        let after = ids_by_prompt(
            "# new comment\n\n{\"duration\":\"5\",\"prompt\":\"d\"}\n{\"prompt\":\"c\"}\n{\"endpoint\":\"/v1/videos/text2video\",\"prompt\":\"a\"}\n",
        );
        assert_eq!(id(&after, "a"), id(&before, "a"));
        assert_eq!(id(&after, "c"), id(&before, "c"));
        assert!(after.iter().all(|(_, i)| i != &id(&before, "b")));
        assert!(before.iter().all(|(_, i)| i.starts_with(DEFAULT_ID_PREFIX)));
        let (jobs, _) = parse_jobs("{\"prompt\":\"a\"}\n{\"id\":\"x\",\"prompt\":\"a\"}\n");
        assert!(jobs[0].has_default_id());
        assert!(!jobs[1].has_default_id());
    }

    #[test]
    fn identical_jobs_are_told_apart_in_order_of_appearance() {
        let text =
            "{\"prompt\":\"a\"}\n{\"prompt\":\"b\"}\n{\"prompt\":\"a\"}\n{\"prompt\":\"a\"}\n";
        let (jobs, errors) = parse_jobs(text);
        assert!(errors.is_empty());
        let base = jobs[0].id.clone();
        assert_eq!(jobs[2].id, format!("{base}-2"));
        assert_eq!(jobs[3].id, format!("{base}-3"));
        assert_ne!(jobs[1].id, base);
        // Another endpoint, another job.
        let (other, _) =
            parse_jobs("{\"prompt\":\"a\",\"endpoint\":\"/text-to-video/kling-3.0\"}\n");
        assert_ne!(other[0].id, base);
        // An explicit id that holds a default name pushes the default one along.
        let (jobs, errors) = parse_jobs(&format!(
            "{{\"id\":\"{base}\",\"prompt\":\"z\"}}\n{{\"prompt\":\"a\"}}\n"
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(jobs[1].id, format!("{base}-2"));
    }
}
