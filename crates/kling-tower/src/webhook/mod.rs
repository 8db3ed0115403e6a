//! Verification of signed Kling callbacks (the Standard Webhooks scheme) and, with the `axum`
//! feature, a handler that verifies them.
//!
//! A signed callback carries `webhook-id`, `webhook-timestamp` (Unix seconds) and
//! `webhook-signature`: one or more space-separated `v1,<base64>` HMAC-SHA256 signatures of
//! `{id}.{timestamp}.{raw body}` (several while a key is being rotated). [`WebhookVerifier`]
//! accepts a message when any signature matches any configured secret (compared in constant
//! time), its timestamp is within ±5 minutes of now, and its id has not been accepted before
//! (a bounded cache of recent ids: an id that has left the tolerance is refused as stale
//! anyway, and past the cache's capacity the oldest id is forgotten even inside it, so a
//! replay of that message would verify again: size [`WebhookVerifier::replay_capacity`] to
//! the callbacks expected within twice the tolerance).
//!
//! Verifying costs one HMAC of the message per configured secret, however many signatures the
//! header lists: the MAC is computed once and each signature compared with it. Only the first
//! [`MAX_SIGNATURES`] (16) entries of `webhook-signature` are read, and entries that are not
//! `v1,` followed by the base64 of 32 bytes are skipped, so a request stuffed with candidates
//! costs no more than one with a single signature.
//!
//! [`WebhookVerifier::verify_tasks`] also reads the tasks a verified body reports (Kling
//! posts one; a proxy batching callbacks may post several), and remembers the id only once it
//! reports one; [`verify_task`](WebhookVerifier::verify_task) is its single-task form, which
//! refuses a body of several tasks rather than return the first and lose the others.
//!
//! Secrets are `whsec_<base64>` (the key is the decoded bytes) or, as `kling-mock` also
//! accepts, raw text used as the key.
//!
//! ```
//! use http::HeaderMap;
//! use kling_tower::webhook::WebhookVerifier;
//!
//! let secret = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=";
//! let verifier = WebhookVerifier::new(secret)?;
//! let body = br#"{"task_id":"t1","task_status":"succeed"}"#;
//! let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
//! let mut headers = HeaderMap::new();
//! headers.insert("webhook-id", "msg_1".parse()?);
//! headers.insert("webhook-timestamp", now.to_string().parse()?);
//! headers.insert("webhook-signature", WebhookVerifier::sign(secret, "msg_1", now, body)?.parse()?);
//! assert!(verifier.verify(&headers, body).is_ok());
//! // The same message again is a replay.
//! assert!(verifier.verify(&headers, body).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "axum")]
pub mod axum;

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::digest::CtOutput;
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::HeaderMap;
use kling_core::{Envelope, TaskReport};
use sha2::Sha256;

use crate::clock::{SystemClock, WallClock};
use crate::error::{ConfigError, WebhookError, WebhookErrorKind};

/// The default tolerance between a message's timestamp and now.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);
/// The default number of recent message ids remembered against replays.
pub const DEFAULT_REPLAY_CAPACITY: usize = 10_000;
/// How many entries of a `webhook-signature` header are read: the first 16, one per secret a
/// sender signs with (a rotation needs two or three). Later entries are ignored, so a message
/// whose signature is among them is refused.
pub const MAX_SIGNATURES: usize = 16;

/// A verified message's id and timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`, Unix seconds.
    pub timestamp: u64,
}

/// Verifies Standard-Webhooks signatures. See the [module docs](self).
///
/// # Clone
///
/// Clones share the secrets and the cache of recently seen ids, so a replay is caught
/// whichever clone sees it.
#[derive(Clone)]
pub struct WebhookVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Vec<Vec<u8>>,
    tolerance: Duration,
    clock: Arc<dyn WallClock>,
    capacity: usize,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    order: VecDeque<(String, u64)>,
    ids: HashSet<String>,
}

impl fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookVerifier")
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.inner.keys.len()),
            )
            .field("tolerance", &self.inner.tolerance)
            .field("replay_capacity", &self.inner.capacity)
            .finish()
    }
}

fn decode_secret(secret: &str) -> Result<Vec<u8>, ConfigError> {
    let secret = secret.trim();
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => STANDARD.decode(b64).map_err(|_| {
            ConfigError::new(
                "webhook_secret",
                "has the whsec_ prefix but is not valid base64 after it",
            )
        })?,
        None => secret.as_bytes().to_vec(),
    };
    if key.is_empty() {
        return Err(ConfigError::new("webhook_secret", "must not be empty"));
    }
    Ok(key)
}

impl WebhookVerifier {
    /// A verifier for one secret, on the system clock, with a ±5 minute tolerance.
    pub fn new(secret: &str) -> Result<WebhookVerifier, ConfigError> {
        Ok(WebhookVerifier {
            inner: Arc::new(Inner {
                keys: vec![decode_secret(secret)?],
                tolerance: DEFAULT_TOLERANCE,
                clock: Arc::new(SystemClock),
                capacity: DEFAULT_REPLAY_CAPACITY,
                seen: Mutex::new(Seen::default()),
            }),
        })
    }

    fn rebuild(
        &self,
        change: impl FnOnce(&mut Vec<Vec<u8>>, &mut Duration, &mut Arc<dyn WallClock>, &mut usize),
    ) -> WebhookVerifier {
        let mut keys = self.inner.keys.clone();
        let mut tolerance = self.inner.tolerance;
        let mut clock = self.inner.clock.clone();
        let mut capacity = self.inner.capacity;
        change(&mut keys, &mut tolerance, &mut clock, &mut capacity);
        WebhookVerifier {
            inner: Arc::new(Inner {
                keys,
                tolerance,
                clock,
                capacity,
                seen: Mutex::new(Seen::default()),
            }),
        }
    }

    /// Also accepts signatures made with `secret` (during a key rotation).
    pub fn with_secret(self, secret: &str) -> Result<WebhookVerifier, ConfigError> {
        let key = decode_secret(secret)?;
        Ok(self.rebuild(|keys, _, _, _| keys.push(key)))
    }

    /// Sets how far a message's timestamp may be from now, either way, rounded up to whole
    /// seconds and at least 1 s: `webhook-timestamp` is whole seconds, so a message signed late
    /// in one second and delivered early in the next would otherwise be refused as stale under
    /// any tolerance below 1 s (and 1.5 s refused one delivered 1.2 s after it was signed).
    pub fn tolerance(self, tolerance: Duration) -> WebhookVerifier {
        let seconds = tolerance
            .as_secs()
            .saturating_add(u64::from(tolerance.subsec_nanos() > 0))
            .max(1);
        self.rebuild(|_, t, _, _| *t = Duration::from_secs(seconds))
    }

    /// Reads the time from `clock`.
    pub fn with_clock(self, clock: impl WallClock) -> WebhookVerifier {
        self.rebuild(|_, _, c, _| *c = Arc::new(clock))
    }

    /// Sets how many recent ids are remembered against replays (at least 1; default
    /// [`DEFAULT_REPLAY_CAPACITY`]). Ids are forgotten once their timestamps leave the tolerance,
    /// and the oldest first when the cache is full: a message forgotten that way while still
    /// inside the tolerance would verify again. Room for the callbacks expected within twice
    /// the tolerance (10 minutes by default) closes that gap.
    pub fn replay_capacity(self, capacity: usize) -> Result<WebhookVerifier, ConfigError> {
        if capacity == 0 {
            return Err(ConfigError::new("replay_capacity", "must be at least 1"));
        }
        Ok(self.rebuild(|_, _, _, c| *c = capacity))
    }

    /// The `webhook-signature` value `v1,<base64>` for a message, as a sender makes it.
    pub fn sign(
        secret: &str,
        id: &str,
        timestamp: u64,
        body: &[u8],
    ) -> Result<String, ConfigError> {
        let key = decode_secret(secret)?;
        let mac = mac(&key, id, timestamp, body);
        Ok(format!(
            "v1,{}",
            STANDARD.encode(mac.finalize().into_bytes())
        ))
    }

    /// Verifies a message: headers present, timestamp within tolerance, a matching signature
    /// among the first [`MAX_SIGNATURES`] entries of `webhook-signature`, and an id not seen
    /// before (which it then remembers). One HMAC of the message per configured secret.
    ///
    /// To remember the id only once the message is handled, so that a delivery whose handling
    /// failed is taken again, use [`verify_unrecorded`](Self::verify_unrecorded) and then
    /// [`record`](Self::record) (the axum route does).
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, WebhookError> {
        self.check(headers, body, true)
            .map(|(verified, _)| verified)
    }

    /// [`verify`](Self::verify) without remembering the id: an id already
    /// [`record`](Self::record)ed is refused as a replay, this one is not yet.
    pub fn verify_unrecorded(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Verified, WebhookError> {
        self.check(headers, body, false)
            .map(|(verified, _)| verified)
    }

    /// [`verify_unrecorded`](Self::verify_unrecorded), and with `record` the id remembered as
    /// [`record`](Self::record) does, on the same reading of the clock and under one lock.
    /// Returns that reading of the clock (Unix seconds) beside the message, for a later
    /// [`remember`](Self::remember).
    fn check(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        record: bool,
    ) -> Result<(Verified, u64), WebhookError> {
        let header = |name: &'static str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    WebhookError::new(
                        WebhookErrorKind::MissingHeader,
                        format!("missing or unreadable `{name}` header"),
                    )
                })
        };
        let id = header("webhook-id")?;
        let timestamp_text = header("webhook-timestamp")?;
        let signatures = header("webhook-signature")?;
        let timestamp: u64 = timestamp_text.parse().map_err(|_| {
            WebhookError::new(
                WebhookErrorKind::BadTimestamp,
                format!("`webhook-timestamp` `{timestamp_text}` is not unix seconds"),
            )
        })?;
        let now = self.inner.clock.unix_now().as_secs();
        let tolerance = self.inner.tolerance.as_secs();
        if now.abs_diff(timestamp) > tolerance {
            return Err(WebhookError::new(
                WebhookErrorKind::Stale,
                format!("timestamp {timestamp} is more than {tolerance}s from now ({now})"),
            ));
        }
        // At most MAX_SIGNATURES entries are read, and only `v1` tags of a SHA-256 MAC's
        // length; the MAC of the message is computed once per secret, whatever the header
        // holds, and each tag compared with it in constant time.
        let tags: Vec<Tag> = signatures
            .split_whitespace()
            .take(MAX_SIGNATURES)
            .filter_map(|sig| sig.strip_prefix("v1,"))
            .filter_map(decode_tag)
            .collect();
        let matched = !tags.is_empty()
            && self.inner.keys.iter().any(|key| {
                let expected = mac(key, id, timestamp, body).finalize();
                // `CtOutput`'s `==` compares in constant time.
                tags.contains(&expected)
            });
        if !matched {
            return Err(WebhookError::new(
                WebhookErrorKind::BadSignature,
                "no v1 signature matches a configured secret",
            ));
        }
        if record {
            self.remember(id, timestamp, now)?;
        } else if self.seen(id) {
            return Err(replayed(id));
        }
        Ok((
            Verified {
                id: id.to_owned(),
                timestamp,
            },
            now,
        ))
    }

    /// Remembers a verified message's id, so a later delivery of it is refused as a replay;
    /// fails with [`WebhookErrorKind::Replayed`] when it is remembered already (another
    /// delivery of it was handled in the meantime).
    pub fn record(&self, verified: &Verified) -> Result<(), WebhookError> {
        let now = self.inner.clock.unix_now().as_secs();
        self.remember(&verified.id, verified.timestamp, now)
    }

    /// Verifies a message and reads the one task it reports: the single-task form of
    /// [`verify_tasks`](Self::verify_tasks), for a sender that posts one task a message (as
    /// Kling does).
    ///
    /// A body that reports several tasks (an array, or an envelope whose `data` holds
    /// several, as a proxy batching callbacks may post) is refused with
    /// [`WebhookErrorKind::SeveralTasks`] before its id is remembered, so no task of it is
    /// lost: read it with [`verify_tasks`](Self::verify_tasks), or let the sender deliver it
    /// again. A body that reports no task (see [`parse_tasks`]) is `Ok(None)`, its id not
    /// remembered either.
    pub fn verify_task(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Option<TaskReport>, WebhookError> {
        let (verified, now) = self.check(headers, body, false)?;
        let mut tasks = parse_tasks(body).unwrap_or_default();
        if tasks.len() > 1 {
            return Err(WebhookError::new(
                WebhookErrorKind::SeveralTasks,
                format!(
                    "message `{}` reports {} tasks and `verify_task` reads one; \
                     read it with `verify_tasks`",
                    verified.id,
                    tasks.len()
                ),
            ));
        }
        let task = tasks.pop();
        if task.is_some() {
            self.remember(&verified.id, verified.timestamp, now)?;
        }
        Ok(task)
    }

    /// Verifies a message and reads every task it reports, in order: the bare task object
    /// Kling posts, or several (an array of them, or an envelope whose `data` holds several,
    /// as a proxy batching callbacks may post). The id is remembered once the body is known
    /// to report a task; a verified body that reports none (see [`parse_tasks`]) is `Ok` with
    /// none, its id not remembered, so that it is read again when the sender delivers it
    /// again (as the [axum route](crate::webhook) answers it `400` each time).
    pub fn verify_tasks(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Vec<TaskReport>, WebhookError> {
        let (verified, now) = self.check(headers, body, false)?;
        let tasks = parse_tasks(body).unwrap_or_default();
        if !tasks.is_empty() {
            self.remember(&verified.id, verified.timestamp, now)?;
        }
        Ok(tasks)
    }

    fn seen(&self, id: &str) -> bool {
        let seen = self.inner.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.ids.contains(id)
    }

    fn remember(&self, id: &str, timestamp: u64, now: u64) -> Result<(), WebhookError> {
        let mut seen = self.inner.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.ids.contains(id) {
            return Err(replayed(id));
        }
        // Ids whose timestamps are out of tolerance would be refused as stale: forget them.
        let horizon = now.saturating_sub(self.inner.tolerance.as_secs());
        while seen
            .order
            .front()
            .is_some_and(|(_, ts)| *ts < horizon || seen.order.len() >= self.inner.capacity)
        {
            if let Some((old, _)) = seen.order.pop_front() {
                seen.ids.remove(&old);
            }
        }
        seen.ids.insert(id.to_owned());
        seen.order.push_back((id.to_owned(), timestamp));
        Ok(())
    }
}

fn replayed(id: &str) -> WebhookError {
    WebhookError::new(
        WebhookErrorKind::Replayed,
        format!("message `{id}` was already accepted"),
    )
}

/// A signature's tag, compared in constant time.
type Tag = CtOutput<Hmac<Sha256>>;

/// The tag of a `v1,<base64>` signature, when it decodes to the 32 bytes of an HMAC-SHA256.
fn decode_tag(b64: &str) -> Option<Tag> {
    // 32 bytes are 44 base64 characters: anything else is not a tag, and is not decoded.
    if b64.len() != 44 {
        return None;
    }
    let bytes: [u8; 32] = STANDARD.decode(b64).ok()?.try_into().ok()?;
    Some(Tag::new(bytes.into()))
}

#[cfg(test)]
thread_local! {
    /// How many MACs of a message this thread computed (tests count them).
    static MACS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn mac(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    #[cfg(test)]
    MACS.with(|n| n.set(n.get() + 1));
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Reads the first task a callback body reports: the bare task object Kling posts (either
/// generation), or a whole `{code, data}` envelope. A body may report several (an array, or
/// a `data` holding several, as a proxy batching callbacks may post): this reads the first
/// alone; [`parse_tasks`] reads them all.
pub fn parse_task(body: &[u8]) -> Option<TaskReport> {
    Envelope::parse_callback(body).ok()?.into_iter().next()
}

/// Reads every task a callback body reports, in order, as
/// [`Envelope::parse_callback`](kling_core::Envelope::parse_callback) does: the bare task
/// object Kling posts (either generation), a whole `{code, data}` envelope, or several tasks
/// (an array of them, or a `data` holding several). `None` when the body is no callback at
/// all (not JSON, or a task in it that cannot be read); `Some` with none when it is JSON that
/// reports no task (`{}`).
///
/// ```
/// use kling_tower::webhook::parse_tasks;
///
/// let body = br#"{"code":0,"data":[{"task_id":"t1","task_status":"processing"},
///                                   {"task_id":"t2","task_status":"succeed"}]}"#;
/// let tasks = parse_tasks(body).unwrap();
/// assert_eq!(tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t1", "t2"]);
/// assert!(parse_tasks(b"{}").unwrap().is_empty());
/// assert!(parse_tasks(b"not json").is_none());
/// ```
pub fn parse_tasks(body: &[u8]) -> Option<Vec<TaskReport>> {
    Envelope::parse_callback(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=";

    #[derive(Debug)]
    struct At(u64);

    impl WallClock for At {
        fn unix_now(&self) -> Duration {
            Duration::from_secs(self.0)
        }
    }

    fn headers(id: &str, timestamp: u64, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", id.parse().unwrap());
        headers.insert("webhook-timestamp", timestamp.to_string().parse().unwrap());
        headers.insert("webhook-signature", signature.parse().unwrap());
        headers
    }

    fn macs() -> usize {
        MACS.with(std::cell::Cell::get)
    }

    #[test]
    fn many_candidates_cost_one_mac_per_secret() {
        let now = 1_700_000_000;
        let verifier = WebhookVerifier::new("other-secret")
            .unwrap()
            .with_secret(SECRET)
            .unwrap()
            .with_clock(At(now));
        let body = vec![b'x'; 4 * 1024];
        let good = WebhookVerifier::sign(SECRET, "msg_1", now, &body).unwrap();
        // Fifteen wrong tags of the right length, then the right one: the 16th entry.
        let wrong = WebhookVerifier::sign("wrong", "msg_1", now, &body).unwrap();
        let mut signature = vec![wrong.as_str(); MAX_SIGNATURES - 1];
        signature.push(&good);
        let before = macs();
        verifier
            .verify(&headers("msg_1", now, &signature.join(" ")), &body)
            .unwrap();
        assert_eq!(macs() - before, 2, "one MAC per configured secret");

        // Ten thousand junk candidates: still two MACs, and the refusal is a bad signature.
        let junk = vec!["v1,AA=="; 10_000].join(" ");
        let before = macs();
        let err = verifier
            .verify(&headers("msg_2", now, &junk), &body)
            .unwrap_err();
        assert_eq!(err.kind(), WebhookErrorKind::BadSignature);
        assert!(macs() - before <= 2, "{} MACs", macs() - before);
    }
}
