//! The checks behind each fuzz target, shared with the corpus-replay test.
//!
//! Each function takes one fuzzer input, feeds it to a parser of outside input and asserts what
//! must hold whatever the input: no panic, errors that name their cause, limits that hold, no
//! secret in any text a user or a log sees. The libFuzzer targets in `fuzz_targets/` call them;
//! `tests/tests/reliability/corpus.rs` includes this file and replays every committed corpus
//! file through the same functions, so CI keeps every finding fixed without the fuzzer.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use kling_core::{
    Code, Disposition, Envelope, MAX_RETRY_AFTER, Outcome, Recognized, RetryAfter,
    retry_after_delay,
};
use kling_tower::StackConfig;
use kling_tower::auth::Credentials;
use kling_tower::clock::WallClock;
use kling_tower::error::WebhookErrorKind;
use kling_tower::webhook::{self, WebhookVerifier};

/// The statuses a Kling response arrives with, picked by the input's first byte.
const STATUSES: [u16; 8] = [200, 400, 401, 403, 404, 429, 500, 503];

/// Splits `data` at the first `n` newlines: `n` header-ish fields, then the rest.
fn fields<const N: usize>(data: &[u8]) -> ([&[u8]; N], &[u8]) {
    let mut out = [&b""[..]; N];
    let mut rest = data;
    for slot in &mut out {
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                *slot = &rest[..i];
                rest = &rest[i + 1..];
            }
            None => {
                *slot = rest;
                rest = &[];
            }
        }
    }
    (out, rest)
}

/// A response body: the envelope parser, the `Outcome` built on it, the error a user would see,
/// and request recognition of the same bytes as a create body.
pub fn envelope(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let status = StatusCode::from_u16(STATUSES[usize::from(first % 8)]).expect("valid status");
    let parsed = Envelope::parse(body);
    // The fast scanner behind `Envelope::parse` and `Outcome` reads exactly what the serde_json
    // reference reads (`Debug` compares floats exactly, NaN and the sign of zero included).
    let same = |a: &Envelope, b: &Envelope| format!("{a:?}") == format!("{b:?}");
    match (&parsed, Envelope::parse_reference(body)) {
        (Ok(fast), Ok(reference)) => assert!(
            same(fast, &reference),
            "fast {fast:?}, reference {reference:?}"
        ),
        (Err(fast), Err(reference)) => assert_eq!(fast.to_string(), reference.to_string()),
        (fast, reference) => panic!("fast {fast:?}, reference {reference:?}"),
    }
    let outcome = Outcome::parse(status, &HeaderMap::new(), body, tokio::time::Instant::now());
    let shared = Outcome::parse_bytes(
        status,
        &HeaderMap::new(),
        body.to_vec().into(),
        tokio::time::Instant::now(),
    );
    match (&outcome, &shared) {
        (Ok(a), Ok(b)) => assert!(
            same(a.envelope(), b.envelope()),
            "parse and parse_bytes agree"
        ),
        (Err(a), Err(b)) => assert_eq!(a.reason(), b.reason()),
        _ => panic!("Outcome::parse and Outcome::parse_bytes disagree"),
    }
    match (&parsed, &outcome) {
        (Ok(env), Ok(outcome)) => {
            assert!(same(env, outcome.envelope()), "one parse, one envelope");
            assert_eq!(outcome.message(), env.message);
            assert_eq!(outcome.request_id(), env.request_id.as_deref());
            assert_eq!(format!("{:?}", outcome.tasks()), format!("{:?}", env.tasks));
            assert_eq!(outcome.code(), env.code);
            // Code round trip: what is read back out is what came in.
            assert_eq!(Code::from_i64(env.code.as_i64()), env.code);
            let disposition = outcome.disposition();
            assert_eq!(outcome.is_success(), disposition == Disposition::Success);
            match outcome.to_result() {
                Ok(()) => assert_eq!(env.code, Code::Success),
                Err(err) => {
                    // The error a user sees names the code, the status and the request id.
                    let text = err.to_string();
                    assert!(text.starts_with("kling error "), "{text}");
                    assert!(text.contains(&env.code.to_string()), "{text}");
                    assert!(text.contains(&status.as_u16().to_string()), "{text}");
                    if let Some(id) = &env.request_id {
                        assert!(text.contains(id.as_str()), "{text}");
                    }
                }
            }
            for task in outcome.tasks() {
                // A status word reads back as itself (both terminal spellings as `succeeded`).
                let word = task.status.as_str();
                assert_eq!(kling_core::TaskStatus::parse(word), task.status);
            }
        }
        (Err(_), Err(malformed)) => {
            assert_eq!(malformed.status(), status);
            assert!(!malformed.reason().is_empty());
            let text = malformed.to_string();
            assert!(
                text.starts_with("malformed kling response (http "),
                "{text}"
            );
            if body.is_empty() {
                assert_eq!(malformed.reason(), "empty body");
            }
        }
        _ => panic!("Envelope::parse and Outcome::parse disagree"),
    }
    // The same bytes as a create body (the user's own input, but it is parsed on every create).
    for uri in [
        "/v1/images/generations",
        "/v1/videos/text2video",
        "/text-to-video/kling-3.0",
    ] {
        let uri: Uri = uri.parse().expect("valid uri");
        let recognized = Recognized::from_parts(&Method::POST, &uri, body);
        assert!(
            (1..=9).contains(&recognized.weight),
            "a create weighs 1..=9"
        );
        assert!(recognized.pool.is_some());
    }
}

/// `Retry-After` and `Date` header values: the parsed delay never exceeds [`MAX_RETRY_AFTER`],
/// never panics, and a delta-seconds value reads as itself.
pub fn retry_after(data: &[u8]) {
    let parsed = RetryAfter::parse(data);
    if let Some(value) = parsed {
        let now = SystemTime::now();
        assert!(value.delay(None, now) <= MAX_RETRY_AFTER);
        assert!(value.delay(Some(UNIX_EPOCH), now) <= MAX_RETRY_AFTER);
        assert!(value.delay(Some(now + Duration::from_secs(3600)), now) <= MAX_RETRY_AFTER);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let trimmed = text.trim();
        if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
            let expected = trimmed.parse::<u64>().map_or(MAX_RETRY_AFTER, |s| {
                Duration::from_secs(s).min(MAX_RETRY_AFTER)
            });
            assert_eq!(parsed, Some(RetryAfter::Delay(expected)));
        }
    }
    // As headers: `Retry-After` on the first line, `Date` on the second.
    let ([retry, date], _) = fields::<2>(data);
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(retry) {
        headers.insert(http::header::RETRY_AFTER, value);
    }
    if let Ok(value) = HeaderValue::from_bytes(date) {
        headers.insert(http::header::DATE, value);
    }
    if let Some(delay) = retry_after_delay(&headers, SystemTime::now()) {
        assert!(delay <= MAX_RETRY_AFTER);
    }
    let outcome = Outcome::parse(
        StatusCode::TOO_MANY_REQUESTS,
        &headers,
        br#"{"code":1302,"message":"too fast","request_id":"r"}"#,
        tokio::time::Instant::now(),
    )
    .expect("a valid envelope");
    if let (Some(delay), Some(at)) = (outcome.retry_after(), outcome.resume_at()) {
        assert!(delay <= MAX_RETRY_AFTER);
        assert_eq!(at, outcome.received_at() + delay);
    }
}

/// A wall clock stopped at a fixed instant, so timestamps in the corpus stay meaningful.
#[derive(Debug, Clone, Copy)]
struct Stopped(Duration);

impl WallClock for Stopped {
    fn unix_now(&self) -> Duration {
        self.0
    }
}

/// The instant the webhook check's clock shows (2025-01-01T00:00:00Z).
pub const WEBHOOK_NOW: u64 = 1_735_689_600;
/// The secret the webhook check verifies with.
pub const WEBHOOK_SECRET: &str = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=";

/// A signed callback: `webhook-id`, `webhook-timestamp` and `webhook-signature` on the first
/// three lines, the body after them. Verification never panics, an unsigned message is never
/// accepted, a correctly signed fresh one always is, a replay never is, the refusal names its
/// header and never quotes the secret, and the payload parsers (the webhook's and the slots
/// layer's) never panic.
pub fn webhook(data: &[u8]) {
    let ([id, timestamp, signature], body) = fields::<3>(data);
    let verifier = WebhookVerifier::new(WEBHOOK_SECRET)
        .expect("valid secret")
        .with_clock(Stopped(Duration::from_secs(WEBHOOK_NOW)));
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("webhook-id", id),
        ("webhook-timestamp", timestamp),
        ("webhook-signature", signature),
    ] {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(name, value);
        }
    }
    let first = verifier.verify(&headers, body);
    match &first {
        Ok(verified) => {
            // Only a real signature passes: recompute it.
            let expected =
                WebhookVerifier::sign(WEBHOOK_SECRET, &verified.id, verified.timestamp, body)
                    .expect("valid secret");
            let sent = headers["webhook-signature"]
                .to_str()
                .expect("verified is text");
            assert!(
                sent.split_whitespace().any(|s| s == expected),
                "accepted a message without the right signature"
            );
            assert!(verified.timestamp.abs_diff(WEBHOOK_NOW) <= 300);
            let again = verifier
                .verify(&headers, body)
                .expect_err("a replay is refused");
            assert!(again.to_string().contains("already accepted"), "{again}");
        }
        Err(err) => {
            let text = err.to_string();
            assert!(text.starts_with("webhook refused: "), "{text}");
            assert!(!text.contains("c2VjcmV0LWtleS1mb3ItdGVzdHM"), "{text}");
        }
    }
    // The same id and body, signed properly and fresh, always pass on a new verifier.
    if let Ok(id) = std::str::from_utf8(id) {
        let id = id.trim();
        // Standard Webhooks ids are visible ASCII; others are refused as unreadable.
        if !id.is_empty() && id.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            let fresh = WebhookVerifier::new(WEBHOOK_SECRET)
                .expect("valid secret")
                .with_clock(Stopped(Duration::from_secs(WEBHOOK_NOW)));
            let signature =
                WebhookVerifier::sign(WEBHOOK_SECRET, id, WEBHOOK_NOW, body).expect("valid secret");
            let mut signed = HeaderMap::new();
            signed.insert("webhook-id", HeaderValue::from_str(id).expect("checked"));
            signed.insert("webhook-timestamp", HeaderValue::from(WEBHOOK_NOW));
            signed.insert(
                "webhook-signature",
                HeaderValue::from_str(&signature).expect("base64 is a header value"),
            );
            // Accepted, unless it reports several tasks, which the single-task form refuses
            // without remembering the id.
            let tasks = webhook::parse_tasks(body).unwrap_or_default();
            match fresh.verify_task(&signed, body) {
                Ok(task) => {
                    assert!(tasks.len() <= 1, "verify_task read one of {}", tasks.len());
                    assert_eq!(task, webhook::parse_task(body));
                }
                Err(err) => {
                    assert_eq!(err.kind(), WebhookErrorKind::SeveralTasks, "{err}");
                    assert!(tasks.len() > 1, "{err}");
                }
            }
            // Every task is read with the same id, unless `verify_task` took the one there
            // was (its id is remembered only then).
            match fresh.verify_tasks(&signed, body) {
                Ok(all) => {
                    assert_ne!(tasks.len(), 1, "a task read twice under one id");
                    assert_eq!(all, tasks);
                }
                Err(err) => {
                    assert_eq!(err.kind(), WebhookErrorKind::Replayed, "{err}");
                    assert_eq!(tasks.len(), 1, "{err}");
                }
            }
        }
    }
    // The payload parsers alone.
    let task = webhook::parse_task(body);
    let (_, handle) =
        kling_concurrency::TaskSlotsLayer::pair(kling_concurrency::SlotsConfig::new(2))
            .expect("valid config");
    let applied = ready(handle.on_callback(body));
    match (task, applied) {
        (Some(_), Ok(applied)) => assert!(applied.released.is_empty(), "no task was held"),
        (_, Err(err)) => assert!(!err.to_string().is_empty()),
        (None, Ok(_)) => {}
    }
}

/// Polls a future that completes without waiting (the in-process backend's operations).
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("an in-process slot operation waited"),
    }
}

/// Configuration: a TOML document, the same text as `KEY=VALUE` lines of `KLING_*` variables,
/// and credentials from the first two lines. A configuration that loads is valid; a refusal
/// names a field; credentials never show their secret.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match StackConfig::from_toml_str(text) {
        Ok(config) => config.validate().expect("a loaded configuration is valid"),
        Err(err) => {
            assert!(!err.field().is_empty());
            assert!(
                err.to_string()
                    .starts_with("invalid kling-tower configuration: `")
            );
        }
    }
    let vars: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    let lookup = |name: &str| {
        vars.iter()
            .rev()
            .find(|(key, _)| key.trim() == name)
            .map(|(_, value)| (*value).to_owned())
    };
    match StackConfig::from_lookup(lookup) {
        Ok(config) => {
            config.validate().expect("a loaded configuration is valid");
            // Scaling never panics, whatever the speed.
            let _ = config.scaled(Duration::from_secs(60));
            let _ = config.pacing_rate_per_minute();
        }
        Err(err) => {
            assert!(!err.field().is_empty());
            let field = err.field();
            assert!(
                field.starts_with("KLING_") || field == "toml",
                "an environment error names its variable: {field}"
            );
        }
    }
    // Credentials: the secret key never changes what `Debug` shows, nor appears in errors.
    let ([access, secret], _) = fields::<2>(data);
    let (Ok(access), Ok(secret)) = (std::str::from_utf8(access), std::str::from_utf8(secret))
    else {
        return;
    };
    match Credentials::access_key(access, secret) {
        Ok(credentials) => {
            let other = Credentials::access_key(access, "another secret").expect("same access key");
            assert_eq!(format!("{credentials:?}"), format!("{other:?}"));
        }
        Err(err) => {
            // Only a field name and a fixed reason; never the values.
            assert!(matches!(err.field(), "access_key" | "secret_key"));
        }
    }
    if let Err(err) = Credentials::api_key(secret) {
        assert_eq!(err.field(), "api_key");
    }
}

/// A JSONL job file (`kling-batch`): every non-blank, non-comment line becomes a job or an
/// error naming its line; job ids are unique and bounded; each job's create body is JSON that
/// carries the external id it is given.
pub fn jsonl(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (jobs, errors) = kling_batch::jobs::parse_jobs(text);
    let lines = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim().starts_with('#'))
        .count();
    assert_eq!(
        jobs.len() + errors.len(),
        lines,
        "each line is a job or an error"
    );
    let total = text.lines().count();
    let mut ids = std::collections::HashSet::new();
    for job in &jobs {
        assert!(ids.insert(job.id.as_str()), "job id {} twice", job.id);
        assert!(job.id.len() <= kling_batch::jobs::MAX_ID_LEN);
        assert!((1..=total).contains(&job.line));
        assert!((1..=9).contains(&job.weight()));
        let body = job.create_body("ext-fuzz-1", Some("https://cb.example/k"));
        let value: serde_json::Value =
            serde_json::from_slice(&body).expect("a create body is JSON");
        assert!(body.windows(10).any(|w| w == b"ext-fuzz-1"), "{value}");
    }
    for error in &errors {
        assert!((1..=total).contains(&error.line()), "{error:?}");
        assert!(!error.reason().is_empty());
    }
}
