//! Jobs: one JSON object per line of a JSONL file.
//!
//! Each line is a create body (`prompt` and any other field Kling takes) plus two fields of
//! the tool's own, which are taken out of the body:
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `id` | `line-N` | the job's id, unique in the file (a string or a number) |
//! | `endpoint` | `/v1/videos/text2video` | the create path: a legacy one (`/v1/images/generations`, …) or a new-style `/{product}/{model}` (`/text-to-video/kling-3.0`) |
//!
//! `external_task_id` / `external_id` are set by the tool (one deterministic id per job, see
//! [`Journal::external_id_for`](crate::journal::Journal::external_id_for)); a line that sets
//! them is refused. Blank lines and lines starting with `#` are skipped.
//!
//! ```
//! use kling_batch::jobs::parse_jobs;
//!
//! let text = "{\"prompt\":\"a cat\"}\nnot json\n{\"id\":\"dog\",\"prompt\":\"a dog\",\"endpoint\":\"/text-to-video/kling-3.0\"}\n";
//! let (jobs, errors) = parse_jobs(text);
//! assert_eq!(jobs.len(), 2);
//! assert_eq!(jobs[0].id, "line-1");
//! assert_eq!(jobs[1].pool().to_string(), "video:kling-3.0");
//! assert_eq!(errors[0].line(), 2);
//! ```

use std::collections::HashSet;

use http::{Method, Uri};
use kling_core::{ApiGeneration, Pool, Recognized};
use serde_json::{Map, Value};

use crate::error::JobError;

/// The create path of a job without an `endpoint`.
pub const DEFAULT_ENDPOINT: &str = "/v1/videos/text2video";

/// The longest job id accepted.
pub const MAX_ID_LEN: usize = 128;

/// One generation job.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Job {
    /// The job's id, unique in its file.
    pub id: String,
    /// The 1-based line it came from.
    pub line: usize,
    /// The create path (`/v1/videos/text2video`, `/text-to-video/kling-3.0`, …).
    pub endpoint: String,
    /// The create body, without the tool's own fields.
    pub body: Map<String, Value>,
    recognized: Recognized,
}

impl Job {
    /// A job from its parts; the endpoint must be a create path.
    pub fn new(
        id: impl Into<String>,
        line: usize,
        endpoint: impl Into<String>,
        body: Map<String, Value>,
    ) -> Result<Job, JobError> {
        let endpoint = endpoint.into();
        let id = id.into();
        if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
            return Err(JobError::new(
                line,
                format!("`id` must be 1 to {MAX_ID_LEN} printable characters"),
            ));
        }
        let uri: Uri = endpoint
            .parse()
            .map_err(|_| JobError::new(line, format!("`endpoint` `{endpoint}` is not a path")))?;
        if uri.scheme().is_some() || !endpoint.starts_with('/') || uri.query().is_some() {
            return Err(JobError::new(
                line,
                format!("`endpoint` `{endpoint}` must be a path such as {DEFAULT_ENDPOINT}"),
            ));
        }
        let raw = serde_json::to_vec(&body).unwrap_or_default();
        let recognized = Recognized::from_parts(&Method::POST, &uri, &raw);
        if !recognized.is_create() || recognized.pool.is_none() {
            return Err(JobError::new(
                line,
                format!("`endpoint` `{endpoint}` is not a Kling create path"),
            ));
        }
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
            body,
            recognized,
        })
    }

    /// The pool the job's task takes its slots from.
    pub fn pool(&self) -> Pool {
        self.recognized
            .pool
            .clone()
            .unwrap_or_else(|| unreachable!("checked in Job::new"))
    }

    /// Slots the task takes (`n` for images).
    pub fn weight(&self) -> u32 {
        self.recognized.weight
    }

    /// Which API generation the endpoint belongs to.
    pub fn generation(&self) -> ApiGeneration {
        self.recognized.generation.unwrap_or(ApiGeneration::Legacy)
    }

    /// The create body with the job's external id (and callback URL, if any) set, in the
    /// field names of the endpoint's generation.
    pub fn create_body(&self, external_id: &str, callback_url: Option<&str>) -> Vec<u8> {
        let mut body = self.body.clone();
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

/// Parses a JSONL text: the jobs of its good lines, and one error per bad line (with its
/// line number), in file order.
pub fn parse_jobs(text: &str) -> (Vec<Job>, Vec<JobError>) {
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    let mut ids = HashSet::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match parse_line(trimmed, line) {
            Ok(job) => {
                if ids.insert(job.id.clone()) {
                    jobs.push(job);
                } else {
                    errors.push(JobError::new(
                        line,
                        format!("job id `{}` is used by an earlier line", job.id),
                    ));
                }
            }
            Err(e) => errors.push(e),
        }
    }
    (jobs, errors)
}

fn parse_line(text: &str, line: usize) -> Result<Job, JobError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| JobError::new(line, format!("not valid JSON: {e}")))?;
    let Value::Object(mut body) = value else {
        return Err(JobError::new(line, "not a JSON object"));
    };
    let id = match body.remove("id") {
        None | Some(Value::Null) => format!("line-{line}"),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err(JobError::new(line, "`id` must be a string or a number")),
    };
    let endpoint = match body.remove("endpoint") {
        None | Some(Value::Null) => DEFAULT_ENDPOINT.to_owned(),
        Some(Value::String(s)) => s,
        Some(_) => return Err(JobError::new(line, "`endpoint` must be a string")),
    };
    Job::new(id, line, endpoint, body)
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
        assert!(errors[2].to_string().contains("earlier line"));
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
}
