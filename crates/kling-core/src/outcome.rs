//! [`Outcome`]: what one response says, parsed once and shared by every layer.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;

use crate::body::PeekBody;
use crate::code::{Code, Disposition};
use crate::envelope::{self, Envelope, Piece, Reports, TaskReport};
use crate::error::{ApiError, MalformedResponse};
use crate::retry_after::retry_after_delay;

/// What one response says: status, business code, message, request id, the tasks it reports
/// and any `Retry-After`.
///
/// [`ClassifyLayer`](crate::ClassifyLayer) parses it once per response and puts it in the
/// response's extensions; every layer above reads it from there ([`Outcome::of`]). Cloning is
/// cheap (the parsed data sits behind an `Arc`).
#[derive(Clone)]
pub struct Outcome {
    inner: Arc<Inner>,
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outcome")
            .field("status", &self.status())
            .field("code", &self.code())
            .field("message", &self.message())
            .field("request_id", &self.request_id())
            .field("tasks", &self.tasks())
            .field("retry_after", &self.inner.retry_after)
            .field("received_at", &self.inner.received_at)
            .finish()
    }
}

/// One representation whichever reader ran: the scanner (the usual case, few allocations) or
/// the serde_json reference it falls back to (whose envelope is taken apart the same way).
struct Inner {
    status: StatusCode,
    /// Whether the classify step that read it counted its request as sent (see
    /// [`Outcome::counted_as_sent`]).
    counted_as_sent: bool,
    code: Code,
    /// Holds `message` and `request_id`.
    texts: Texts,
    message: Range<usize>,
    request_id: Option<Range<usize>>,
    tasks: Reports,
    /// See [`Outcome::lists_every_task`]; recorded by whichever reader ran.
    lists_every_task: bool,
    /// Built on the first [`Outcome::envelope`] call only (boxed: most outcomes never build
    /// it, and a smaller `Inner` is cheaper to allocate).
    envelope: OnceLock<Box<Envelope>>,
    retry_after: Option<Duration>,
    received_at: Instant,
}

/// Message and request id copied together into one string, and where each is in it.
fn copy_texts(
    message: Option<&str>,
    request_id: Option<&str>,
) -> (Texts, Range<usize>, Option<Range<usize>>) {
    let message = message.unwrap_or_default();
    let mut both = String::with_capacity(message.len() + request_id.map_or(0, str::len));
    both.push_str(message);
    both.push_str(request_id.unwrap_or_default());
    let request_id = request_id.map(|_| message.len()..both.len());
    (
        Texts::Copied(both.into_boxed_str()),
        0..message.len(),
        request_id,
    )
}

/// Where the message and request id live: in the (small) body itself, or copied together into
/// one string (a body borrowed, a large one not to be kept alive, or escaped texts).
enum Texts {
    Body(Bytes),
    Copied(Box<str>),
}

impl Texts {
    fn get(&self, range: Range<usize>) -> &str {
        match self {
            // The scanner read the range from the UTF-8-checked body, at char boundaries.
            Texts::Body(body) => std::str::from_utf8(body.get(range).unwrap_or_default())
                .expect("a range the scanner read from checked UTF-8"),
            Texts::Copied(text) => text.get(range).unwrap_or_default(),
        }
    }
}

/// Bodies up to this size are kept by the outcome for its message and request id (no copy);
/// larger ones are not kept alive by it.
const KEEP_BODY: usize = 4096;

/// The body given to [`Outcome::read`].
enum Body<'b> {
    Slice(&'b [u8]),
    Bytes(Bytes),
}

impl Body<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Body::Slice(body) => body,
            Body::Bytes(body) => body,
        }
    }
}

impl Outcome {
    /// Parses a response's status, headers and body.
    ///
    /// `received_at` is when the response arrived (tokio time): [`Outcome::resume_at`] counts
    /// the `Retry-After` from it. An HTTP-date `Retry-After` is read against the response's
    /// `Date` header, or against the system clock when there is none.
    pub fn parse(
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        received_at: Instant,
    ) -> Result<Outcome, MalformedResponse> {
        let has_retry_after = headers.contains_key(RETRY_AFTER);
        Outcome::read(
            status,
            headers,
            has_retry_after,
            Body::Slice(body),
            received_at,
            false,
        )
    }

    /// [`Outcome::parse`] of a body already in [`Bytes`]: a small body is kept (shared, not
    /// copied) to hold the message and request id.
    pub fn parse_bytes(
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        received_at: Instant,
    ) -> Result<Outcome, MalformedResponse> {
        let has_retry_after = headers.contains_key(RETRY_AFTER);
        Outcome::read(
            status,
            headers,
            has_retry_after,
            Body::Bytes(body),
            received_at,
            false,
        )
    }

    /// [`Outcome::parse_bytes`] for the classify step, which already knows whether the headers
    /// hold a `Retry-After` (it finds it in the pass that looks for `Content-Length`) and
    /// whether it counted the request as sent ([`Outcome::counted_as_sent`]).
    pub(crate) fn parse_classified(
        status: StatusCode,
        headers: &HeaderMap,
        has_retry_after: bool,
        body: Bytes,
        received_at: Instant,
        counted_as_sent: bool,
    ) -> Result<Outcome, MalformedResponse> {
        Outcome::read(
            status,
            headers,
            has_retry_after,
            Body::Bytes(body),
            received_at,
            counted_as_sent,
        )
    }

    fn read(
        status: StatusCode,
        headers: &HeaderMap,
        has_retry_after: bool,
        body: Body<'_>,
        received_at: Instant,
        counted_as_sent: bool,
    ) -> Result<Outcome, MalformedResponse> {
        // The system clock is only read for a `Retry-After` (an HTTP-date needs it).
        let retry_after = if has_retry_after {
            retry_after_delay(headers, SystemTime::now())
        } else {
            None
        };
        let bytes = body.as_slice();
        let mut tasks = Reports::None;
        let lists_every_task;
        // The scanner checks the body's UTF-8 (a body that is not goes to the reference).
        let (code, (texts, message, request_id)) = match envelope::scan(bytes, &mut tasks).ok() {
            Some(head) => {
                lists_every_task = head.lists_every_task;
                let code = Code::from_i64(head.code);
                let message = head.message.as_ref().map_or(Some(0..0), Piece::range);
                let request_id = head.request_id.as_ref().map(Piece::range);
                // Unescaped texts of a small shared body: kept there, no copy.
                let in_body = matches!(&body, Body::Bytes(body) if body.len() <= KEEP_BODY)
                    && message.is_some()
                    && !matches!(request_id, Some(None));
                if in_body {
                    drop(head);
                    let texts = match body {
                        Body::Bytes(body) => Texts::Body(body),
                        // `in_body` holds only for `Bytes`.
                        Body::Slice(_) => Texts::Copied(Box::default()),
                    };
                    (
                        code,
                        (texts, message.unwrap_or_default(), request_id.flatten()),
                    )
                } else {
                    (
                        code,
                        copy_texts(
                            head.message.as_ref().map(Piece::as_str),
                            head.request_id.as_ref().map(Piece::as_str),
                        ),
                    )
                }
            }
            None => {
                let envelope = Envelope::parse_reference(bytes).map_err(|e| {
                    let reason = if bytes.is_empty() {
                        "empty body".to_owned()
                    } else {
                        e.to_string()
                    };
                    MalformedResponse::new(status, reason)
                        .with_retry_after(retry_after, received_at)
                })?;
                tasks = Reports::from(envelope.tasks);
                lists_every_task = envelope.lists_every_task;
                (
                    envelope.code,
                    copy_texts(Some(&envelope.message), envelope.request_id.as_deref()),
                )
            }
        };
        // Built last, with the tasks moved in: a unique `Arc` built first and filled through
        // `Arc::get_mut` costs an atomic compare-exchange, and moves no fewer bytes.
        let inner = Arc::new(Inner {
            status,
            counted_as_sent,
            code,
            texts,
            message,
            request_id,
            tasks,
            lists_every_task,
            envelope: OnceLock::new(),
            retry_after,
            received_at,
        });
        Ok(Outcome { inner })
    }

    /// The outcome attached to a response, if the classify step ran.
    pub fn of<B>(response: &Response<B>) -> Option<&Outcome> {
        response.extensions().get::<Outcome>()
    }

    /// The outcome of a buffered response: the attached one, or one parsed now from the body
    /// and attached for the next layer (so each layer also works without `ClassifyLayer`).
    pub fn ensure(response: &mut Response<Full<Bytes>>) -> Result<Outcome, MalformedResponse> {
        if let Some(outcome) = response.extensions().get::<Outcome>() {
            return Ok(outcome.clone());
        }
        let body = response.body().peek_bytes();
        let outcome =
            Outcome::parse_bytes(response.status(), response.headers(), body, Instant::now())?;
        response.extensions_mut().insert(outcome.clone());
        Ok(outcome)
    }

    /// Whether the classify step that read this answer counted its request as sent, through
    /// the request's [`SendCounter`](crate::signals::SendCounter): false for an outcome parsed
    /// anywhere else ([`Outcome::parse`], [`Outcome::ensure`] — a layer that reads an answer
    /// that passed no classify step) and for a request that carried no counter. A metrics
    /// layer counts an answer's requests itself unless this says the step did.
    pub fn counted_as_sent(&self) -> bool {
        self.inner.counted_as_sent
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.inner.status
    }

    /// The business code.
    pub fn code(&self) -> Code {
        self.inner.code
    }

    /// The server's message.
    pub fn message(&self) -> &str {
        self.inner.texts.get(self.inner.message.clone())
    }

    /// The server's request id.
    pub fn request_id(&self) -> Option<&str> {
        let inner = &*self.inner;
        inner.request_id.clone().map(|range| inner.texts.get(range))
    }

    /// The tasks the response reports (one for a create or single query, several for lists
    /// and batch queries).
    pub fn tasks(&self) -> &[TaskReport] {
        self.inner.tasks.as_slice()
    }

    /// Whether the envelope's `data` is a list every element of which was read as a task, so
    /// that [`tasks`](Self::tasks) is the whole list (an empty one included). An outcome reports
    /// no task both for `"data": []` and for a `data` it could not read (`null`, missing, an
    /// element without id or status), which an answer to a lookup by external id must tell
    /// apart: only the first says a task does not exist. An element that is itself a list or a
    /// page (holds `tasks`) is no task: tasks found inside it must not make up, in the count,
    /// for another element that was not read.
    ///
    /// Recorded when the body was read (by the scanner or its serde_json fallback alike), so
    /// asking costs nothing; false for an error envelope read only for its code and texts.
    pub fn lists_every_task(&self) -> bool {
        self.inner.lists_every_task
    }

    /// The first task reported, e.g. the task a create made.
    pub fn task(&self) -> Option<&TaskReport> {
        self.tasks().first()
    }

    /// The parsed envelope (built on the first call: the layers read the parts above).
    pub fn envelope(&self) -> &Envelope {
        self.inner.envelope.get_or_init(|| {
            Box::new(Envelope {
                code: self.code(),
                message: self.message().to_owned(),
                request_id: self.request_id().map(str::to_owned),
                tasks: self.tasks().to_vec(),
                lists_every_task: self.lists_every_task(),
            })
        })
    }

    /// What a client should do, from the code and (for unknown codes) the status.
    pub fn disposition(&self) -> Disposition {
        self.code().disposition(self.status())
    }

    /// Whether a create answered so may have created a billed task
    /// ([`Code::may_have_created_under`]: its code, and for an unknown code its status).
    pub fn may_have_created(&self) -> bool {
        self.code().may_have_created_under(self.status())
    }

    /// Whether the request succeeded (code 0).
    pub fn is_success(&self) -> bool {
        self.disposition() == Disposition::Success
    }

    /// The wait a `Retry-After` header asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    /// When the response arrived (tokio time).
    pub fn received_at(&self) -> Instant {
        self.inner.received_at
    }

    /// The earliest instant a retry may be sent, if the server said (`Retry-After`).
    pub fn resume_at(&self) -> Option<Instant> {
        self.inner
            .retry_after
            .map(|delay| self.inner.received_at + delay)
    }

    /// `Ok` for a success, else the [`ApiError`] with code, message and request id.
    pub fn to_result(&self) -> Result<(), ApiError> {
        if self.is_success() {
            Ok(())
        } else {
            Err(ApiError::from_outcome(self))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 429 `1102` with a field of an odd type elsewhere is still a `1102`: read as malformed,
    /// it would be retried as a throttled 429.
    #[tokio::test(start_paused = true)]
    async fn an_exhausted_pack_with_an_odd_field_is_fatal_not_retried() {
        let body = br#"{"code":1102,"message":"resource pack exhausted","request_id":"r","data":{"status":429}}"#;
        let outcome = Outcome::parse(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            body,
            Instant::now(),
        )
        .unwrap();
        assert_eq!(outcome.code(), Code::from_i64(1102));
        assert_eq!(outcome.disposition(), Disposition::Fatal);
        assert_eq!(outcome.request_id(), Some("r"));
    }

    fn parsed(body: &[u8]) -> Outcome {
        Outcome::parse(StatusCode::OK, &HeaderMap::new(), body, Instant::now())
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
    }

    /// What `lists_every_task` answered when it read the body again with serde_json (before
    /// the readers recorded it): the oracle the recorded flag must agree with.
    fn reread_lists_every_task(outcome: &Outcome, body: &[u8]) -> bool {
        fn is_task(element: &serde_json::Value) -> bool {
            let Some(fields) = element.as_object() else {
                return false;
            };
            let id = |key| {
                fields
                    .get(key)
                    .is_some_and(|v| v.is_string() || v.is_number())
            };
            let status = |key| fields.get(key).is_some_and(serde_json::Value::is_string);
            !fields.contains_key("tasks")
                && ((id("task_id") && status("task_status")) || (id("id") && status("status")))
        }
        serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|envelope| {
            envelope
                .get("data")
                .and_then(serde_json::Value::as_array)
                .is_some_and(|list| list.len() == outcome.tasks().len() && list.iter().all(is_task))
        })
    }

    /// The flag each reader records equals what the old second read said, on both paths: each
    /// `data` is read once as the scanner takes it, and once beside an escaped key, which the
    /// scanner hands to the serde_json fallback.
    #[test]
    fn the_recorded_list_flag_agrees_with_a_second_read_on_both_paths() {
        let datas: [(&str, bool); 24] = [
            // A legacy list page and a new-style batch.
            (
                r#"[{"task_id":"t1","task_status":"succeed","task_info":{"external_task_id":"e1"}},
                    {"task_id":"t2","task_status":"processing","task_result":{"videos":[{"url":"u"}]}}]"#,
                true,
            ),
            (
                r#"[{"id":"a","status":"submitted","external_id":"e1"},
                    {"id":"b","status":"succeeded","outputs":[{"url":"u"}],"billing":[{"amount":1}]}]"#,
                true,
            ),
            ("[]", true),
            (" \t[ ]", true),
            (
                r#"[{"task_id":7,"task_status":"succeed"},{"id":"b","status":"failed"}]"#,
                true,
            ),
            (
                r#"[{"task_id":"","task_status":"s","id":"c","status":"failed"}]"#,
                true,
            ),
            ("null", false),
            // Elements without id or status, or with an empty id.
            (r#"[{"id":"t1"}]"#, false),
            (
                r#"[{"id":"a","status":"submitted"},{"status":"failed"}]"#,
                false,
            ),
            (r#"[{"id":"","status":"submitted"}]"#, false),
            (r#"[{"task_id":"t1","task_status":null}]"#, false),
            (r#"[null]"#, false),
            (r#"["t1",1]"#, false),
            // An element that is a page or a list: no task, whatever it holds.
            (r#"[{"tasks":[{"id":"a","status":"submitted"}]}]"#, false),
            (r#"[{"id":"a","status":"submitted","tasks":null}]"#, false),
            (r#"[{"id":"a","status":"submitted","tasks":[]}]"#, false),
            (
                r#"[[{"id":"a","status":"submitted"},{"id":"b","status":"submitted"}],{"id":"c","external_id":"job-1"}]"#,
                false,
            ),
            (r#"[[{"id":"a","status":"submitted"}]]"#, false),
            // `data` an object: a single task, a page, nothing.
            (r#"{"task_id":"t1","task_status":"submitted"}"#, false),
            (r#"{"tasks":[{"id":"a","status":"submitted"}]}"#, false),
            ("{}", false),
            (r#""[]""#, false),
            // Escaped keys inside the elements (the scanner hands both variants on).
            (r#"[{"\u0069d":"a","status":"submitted"}]"#, true),
            (
                r#"[{"id":"a","status":"submitted","\u0074asks":null}]"#,
                false,
            ),
        ];
        let mut bodies = Vec::new();
        for (data, expected) in datas {
            bodies.push((
                format!(r#"{{"code":0,"message":"SUCCEED","request_id":"r","data":{data}}}"#),
                !data.contains("\\u"),
                expected,
            ));
            bodies.push((
                format!(r#"{{"code":0,"\u0078":1,"message":"SUCCEED","data":{data}}}"#),
                false,
                expected,
            ));
        }
        for (body, scanned, expected) in [
            (r#"{"code":0,"message":"SUCCEED"}"#, true, false),
            (
                r#"{"code":0,"message":"\"data\":[]","data":null}"#,
                true,
                false,
            ),
            (
                r#"{"code":0,"message":"SUCCEED","\u0064ata":[]}"#,
                false,
                true,
            ),
            (r#"{"code":0,"\u0064ata":[{"id":"a"}]}"#, false, false),
            // An error code's list is read alike.
            (
                r#"{"code":1203,"message":"not found","data":[]}"#,
                true,
                true,
            ),
        ] {
            bodies.push((body.to_owned(), scanned, expected));
        }
        for (body, scanned, expected) in &bodies {
            let bytes = body.as_bytes();
            let mut tasks = Reports::None;
            assert_eq!(
                envelope::scan(bytes, &mut tasks).is_ok(),
                *scanned,
                "which reader: {body}"
            );
            let outcome = parsed(bytes);
            let oracle = reread_lists_every_task(&outcome, bytes);
            assert_eq!(oracle, *expected, "the oracle itself: {body}");
            assert_eq!(outcome.lists_every_task(), oracle, "{body}");
            let envelope = Envelope::parse(bytes).unwrap();
            assert_eq!(envelope.lists_every_task, oracle, "Envelope::parse: {body}");
            assert_eq!(outcome.envelope().lists_every_task, oracle, "{body}");
        }
        // Both answers occur on both paths.
        for path in [true, false] {
            for answer in [true, false] {
                assert!(
                    bodies
                        .iter()
                        .any(|(_, scanned, expected)| *scanned == path && *expected == answer),
                    "no body read by the {} with the answer {answer}",
                    if path { "scanner" } else { "fallback" }
                );
            }
        }
    }

    /// Where the second read failed for reasons of its own (a byte-order mark; in a field no
    /// reader looks at, nesting past serde_json's limit, a lone surrogate escape, a number
    /// past `f64`'s range, a byte that is no UTF-8), the list the outcome read is whole.
    #[test]
    fn a_list_read_past_a_mark_or_deep_nesting_elsewhere_is_whole() {
        let deep = format!(
            r#"{{"code":0,"x":{}{},"data":[]}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        for body in [
            &b"\xEF\xBB\xBF{\"code\":0,\"data\":[]}"[..],
            deep.as_bytes(),
            br#"{"code":0,"x":"\ud800","data":[]}"#,
            br#"{"code":0,"data":[{"id":"a","status":"failed","x":1e400}]}"#,
            b"{\"code\":0,\"x\":\"\xFF\",\"data\":[]}",
        ] {
            let outcome = parsed(body);
            assert!(outcome.lists_every_task());
            assert!(!reread_lists_every_task(&outcome, body));
        }
    }

    /// Neither of two `data` keys is taken (the second read took the last): a success so
    /// written is malformed, an error is read for its code alone and lists nothing.
    #[test]
    fn two_data_keys_list_nothing() {
        let success = br#"{"code":0,"data":[{"id":"a"}],"data":[]}"#;
        assert!(
            Outcome::parse(StatusCode::OK, &HeaderMap::new(), success, Instant::now()).is_err()
        );
        let error = br#"{"code":1303,"data":[{"id":"a"}],"data":[]}"#;
        let outcome = parsed(error);
        assert_eq!(outcome.code(), Code::from_i64(1303));
        assert!(!outcome.lists_every_task());
        assert!(reread_lists_every_task(&outcome, error));
    }

    /// No reader keeps fewer tasks than a long list holds (the fallback's visitor caps only
    /// the room it reserves), so a whole list of thousands reports each, on both paths; one
    /// element not read among them makes it not whole.
    #[test]
    fn a_long_list_is_read_to_its_end_on_both_paths() {
        let tasks: Vec<String> = (0..3000)
            .map(|i| format!(r#"{{"id":"t{i}","status":"submitted","external_id":"e{i}"}}"#))
            .collect();
        let whole = format!("[{}]", tasks.join(","));
        let one_unread = format!(r#"[{},{{"id":"x"}}]"#, tasks.join(","));
        for (data, expected) in [(whole, true), (one_unread, false)] {
            for head in [r#"{"code":0"#, r#"{"code":0,"\u0078":1"#] {
                let body = format!(r#"{head},"data":{data}}}"#);
                let mut scanned = Reports::None;
                assert_eq!(
                    envelope::scan(body.as_bytes(), &mut scanned).is_ok(),
                    !head.contains('\\')
                );
                let outcome = parsed(body.as_bytes());
                assert_eq!(outcome.tasks().len(), 3000, "{head}");
                assert_eq!(outcome.lists_every_task(), expected, "{head}");
            }
        }
    }

    /// An error envelope whose fields do not all read is read for its code and texts alone:
    /// its `data` was never read, so it lists nothing (the second read said otherwise; no
    /// caller asks of an error).
    #[tokio::test(start_paused = true)]
    async fn an_error_read_for_its_code_alone_lists_nothing() {
        let error =
            br#"{"code":1102,"message":"resource pack exhausted","request_id":5,"data":[]}"#;
        let outcome = Outcome::parse(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            error,
            Instant::now(),
        )
        .unwrap();
        assert_eq!(outcome.code(), Code::from_i64(1102));
        assert!(!outcome.lists_every_task());
        assert!(reread_lists_every_task(&outcome, error));
    }

    #[tokio::test(start_paused = true)]
    async fn a_page_that_is_no_envelope_keeps_its_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "60".parse().unwrap());
        let now = Instant::now();
        let err = Outcome::parse(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers,
            b"<html>down for maintenance</html>",
            now,
        )
        .unwrap_err();
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.retry_after(), Some(Duration::from_secs(60)));
        assert_eq!(err.received_at(), Some(now));
        assert_eq!(err.resume_at(), Some(now + Duration::from_secs(60)));
        let without = Outcome::parse(StatusCode::BAD_GATEWAY, &HeaderMap::new(), b"", now);
        assert_eq!(without.unwrap_err().resume_at(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_counts_from_arrival() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        let now = Instant::now();
        let outcome = Outcome::parse(
            StatusCode::TOO_MANY_REQUESTS,
            &headers,
            br#"{"code":1302,"message":"too fast","request_id":"r"}"#,
            now,
        )
        .unwrap();
        assert_eq!(outcome.code(), Code::RateLimited);
        assert_eq!(outcome.resume_at(), Some(now + Duration::from_secs(7)));
        let err = outcome.to_result().unwrap_err();
        assert_eq!(
            err.to_string(),
            "kling error 1302 (requests too fast), http 429: too fast (request_id r)"
        );
    }

    #[tokio::test]
    async fn ensure_attaches_once() {
        let mut res = Response::new(Full::new(Bytes::from_static(
            br#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"t","task_status":"submitted"}}"#,
        )));
        let outcome = Outcome::ensure(&mut res).unwrap();
        assert_eq!(outcome.task().unwrap().id, "t");
        assert!(Outcome::of(&res).is_some());

        let mut bad = Response::new(Full::new(Bytes::new()));
        let err = Outcome::ensure(&mut bad).unwrap_err();
        assert_eq!(err.reason(), "empty body");
    }
}
