//! The [`Metrics`](crate::Metrics) response future.

use std::cell::Cell;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use kling_core::error::{ApiError, Attempts, BodyTooLarge, BoxError, MalformedResponse};
use kling_core::lanes::Lane;
use kling_core::metrics::{
    LABEL_CODE, LABEL_KIND, LABEL_POOL, LABEL_STATUS, REQUEST_DURATION, RESPONSES,
};
use kling_core::signals::{Attempt, SendWatch, Waited};
use kling_core::{Code, Outcome, RequestKind, SendState};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tracing::Span;

use crate::labels;
use crate::recorder::{self, Probe, Target};
use crate::service::Tap;

pin_project! {
    /// Waits for the inner call inside the request's span, then records its metrics.
    ///
    /// Dropped before the call ended (once polled), it records the call as cancelled and
    /// counts the request it may have sent (see [`Call::dropped`]).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        call: Option<Call>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Not while a panic unwinds: a warning hook that panicked too would abort.
            let this = this.project();
            if let Some(call) = this.call.take()
                && !std::thread::panicking()
            {
                call.dropped(this.span);
            }
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("span", &self.span)
            .field("done", &self.call.is_none())
            .finish_non_exhaustive()
    }
}

/// What the future needs to record once the call ends.
pub(crate) struct Call {
    pub(crate) start: Instant,
    /// The kind and pool labels; only the kind's being a create when nothing records them
    /// (see `Metrics::call`).
    pub(crate) kind: RequestKind,
    pub(crate) pool: labels::Value,
    pub(crate) monitor: MonitorHandle,
    pub(crate) target: Target,
    /// A create's send watch, shared with the layers below (see [`Call::dropped`]); only made
    /// while the lane does not know that a classify step below counts its requests (the watch
    /// is read only then).
    pub(crate) watch: Option<SendWatch>,
    /// Whether the request carries this lane's [`kling_core::signals::SendCounter`], for a
    /// classify step below to count each request it sends (see [`Call::counted_below`]).
    pub(crate) counter: bool,
    /// Whether the inner call was polled: a future never polled sent nothing.
    pub(crate) polled: bool,
}

/// A call's hold on the monitor: its thread's lane ([`kling_core::lanes`]), whose count only
/// that thread writes (a clone of the monitor writes a count every thread shares, and each
/// write can cost a cache-line transfer between cores).
pub(crate) type MonitorHandle = Arc<Lane<Tap>>;

impl<F> ResponseFuture<F> {
    /// Inlined: the inner future (the whole stack below) is large, and each move is a `memcpy`.
    #[inline(always)]
    pub(crate) fn new(inner: F, span: Span, call: Call) -> Self {
        ResponseFuture {
            inner,
            span,
            call: Some(call),
        }
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Full<Bytes>>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Full<Bytes>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        if let Some(call) = this.call {
            call.polled = true;
        }
        let mut result = ready!(this.inner.poll(cx)).map_err(Into::into);
        let call = this
            .call
            .take()
            .expect("ResponseFuture polled after completion");
        // Looked at in place: a response is large enough that each move is a `memcpy`.
        match &mut result {
            Ok(response) => call.response(response, this.span),
            Err(error) => call.error(&**error, this.span),
        }
        Poll::Ready(result)
    }
}

impl Call {
    /// Whether a classify step below counted the call's requests in the rate window as it sent
    /// them: the request carried the lane's counter and the lane knows a classify step takes
    /// it (see [`Tap`]). Else the call counts them when it ends.
    #[inline]
    fn counted_below(&self) -> bool {
        self.counter && self.monitor.counted_below()
    }

    /// The call's future was dropped before its answer (a caller's timeout, a cancelled job).
    /// Once polled, it is recorded as a call that ended at the drop with `status="error"` and
    /// `code="cancelled"`: the calls a caller's deadline cuts short are the slowest, and left
    /// out, the duration histogram's tail read short. Never polled, it made no call.
    ///
    /// A classify step below counts its requests itself, each at the instant it was sent, the
    /// one in flight included (see [`Tap`]).
    ///
    /// With no classify step below, its request counts in the rate window, as an answered
    /// one does, when it may have left and so reached Kling, which counts it against the
    /// account. That is known of a create only (the only request given a [`SendWatch`]): once
    /// polled, unless a layer below holds it back unsent ([`SendWatch::never_sent`]: waiting
    /// for its slots or its rate-limit turn, or in the retry layer's backoff after attempts
    /// that made no task). One request, whichever attempt was under way: nothing tells this
    /// layer how many attempts went before, so an attempt answered and retried (a 1303, a
    /// 5000) is not counted, nor is a dropped request of another kind.
    fn dropped(mut self, span: &Span) {
        if !self.polled {
            return;
        }
        let end = Instant::now();
        if !self.counted_below()
            && let Some(watch) = &self.watch
            && !watch.never_sent()
        {
            self.monitor.note_requests(end, 1);
        }
        // No answer showed the pool exists.
        labels::settle_pool(&mut self.pool, || false);
        self.record(
            labels::Status::None,
            labels::CodeLabel::Cancelled,
            end,
            span,
        );
    }

    fn response(mut self, response: &mut Response<Full<Bytes>>, span: &Span) {
        let status = response.status();
        // Whether an outcome is attached (by the classify step, or here): when it is the only
        // extension, there is no `Attempt` to look up.
        let mut attached = true;
        // Whether a classify step read the answer and counted its request as it sent it (the
        // outcome it attached says so): an answer that came up past any classify step was
        // counted by none, whatever the lane learned from other calls, also when a layer
        // between attached an outcome to it (the task slots parse what they pass up).
        let mut classified = false;
        let (code, end) = match Outcome::of(response) {
            Some(outcome) => {
                classified = outcome.counted_as_sent();
                self.outcome(outcome, status, span)
            }
            // Parsed here only when no classify step attached it.
            None => match Outcome::ensure(response) {
                Ok(outcome) => self.outcome(&outcome, status, span),
                Err(malformed) => {
                    attached = false;
                    labels::settle_pool(&mut self.pool, || false);
                    self.monitor.note_final(status, None);
                    tracing::warn!(
                        target: "kling_metrics",
                        http_status = status.as_u16(),
                        // The parser's reason quotes the value it could not read (a gateway's
                        // `code` may be the header it refused).
                        reason = %RedactedText(malformed.reason()),
                        "kling call answered with no envelope"
                    );
                    (labels::CodeLabel::Malformed, Instant::now())
                }
            },
        };
        let extensions = response.extensions();
        let others = !attached || extensions.len() > 1;
        let mut sent = 1;
        if others && let Some(&Attempt(attempts)) = extensions.get::<Attempt>() {
            if !span.is_disabled() {
                span.record("attempt", attempts);
            }
            sent = attempts.max(1);
        }
        // A classify step below counted each request as it sent it, unless the answer came
        // up past one. Else counted when answered, as many as were sent: a create that waited
        // minutes for a slot was sent at the end of its wait, and a retry layer's attempts each
        // reached Kling.
        if !(classified && self.counted_below()) {
            self.monitor.note_requests(end, u64::from(sent));
        }
        if !span.is_disabled()
            && let Some(waited) = extensions.get::<Waited>()
        {
            span.record("wait_rate_limit_s", waited.rate_limit.as_secs_f64());
            span.record("wait_slots_s", waited.slots.as_secs_f64());
        }
        self.record(labels::Status::Http(status), code, end, span);
    }

    /// Reports what the response said; returns its `code` label and the call's end.
    fn outcome(
        &mut self,
        outcome: &Outcome,
        status: StatusCode,
        span: &Span,
    ) -> (labels::CodeLabel, Instant) {
        // The classify step read the clock when the response arrived: the layers between it
        // and this one only pass the response up, so that is the call's end. An outcome from
        // before the call (a response replayed from a cache) is not.
        let end = match outcome.received_at() {
            received if received >= self.start => received,
            _ => Instant::now(),
        };
        labels::settle_pool(&mut self.pool, || pool_shown(outcome.code()));
        self.monitor
            .observe_tasks(self.kind == RequestKind::Create, &self.pool, outcome, end);
        if !span.is_disabled() {
            span.record("request_id", outcome.request_id());
            if let [task] = outcome.tasks() {
                span.record("task_id", task.id.as_str());
            }
        }
        if !outcome.is_success() {
            failed(outcome, status);
        }
        self.monitor
            .note_final(status, Some(outcome.code().as_i64()));
        (labels::CodeLabel::Kling(outcome.code()), end)
    }

    fn error(mut self, error: &(dyn StdError + 'static), span: &Span) {
        let end = Instant::now();
        let (sent, attempts) = requests_sent(error);
        // Counted as they were sent when a classify step below counts them.
        if sent > 0 && !self.counted_below() {
            self.monitor.note_requests(end, u64::from(sent));
        }
        // Which attempt ended the call, as a response's `Attempt` says for an answered one.
        if let Some(attempts) = attempts
            && !span.is_disabled()
        {
            span.record("attempt", attempts);
        }
        let cause = find_cause(error);
        gave_up(error, cause.as_ref());
        let shown = matches!(&cause, Some(Cause::Api(api)) if pool_shown(api.code()));
        labels::settle_pool(&mut self.pool, || shown);
        let (status, code) = match cause {
            Some(Cause::Api(api)) => {
                span.record("request_id", api.request_id());
                self.monitor
                    .note_final(api.status(), Some(api.code().as_i64()));
                (
                    labels::Status::Http(api.status()),
                    labels::CodeLabel::Kling(api.code()),
                )
            }
            Some(Cause::Malformed(status)) => {
                self.monitor.note_final(status, None);
                (labels::Status::Http(status), labels::CodeLabel::Malformed)
            }
            // Held back here, not failed by the API or the network: a label of its own. Not
            // when a retry layer's earlier attempts reached Kling (`sent`): the API failed it.
            None if sent == 0 && kling_core::error::refused_before_sending(error) => {
                (labels::Status::None, labels::CodeLabel::Refused)
            }
            None => (labels::Status::None, labels::CodeLabel::None),
        };
        self.record(status, code, end, span);
    }

    /// Inlined: with no span and no recorder (the bench's case) there is nothing to do.
    #[inline]
    fn record(self, status: labels::Status, code: labels::CodeLabel, end: Instant, span: &Span) {
        if self.target != Target::Nothing || !span.is_disabled() {
            self.record_to(status, code, end, span);
        }
    }

    /// [`Call::record`] to the span and the recorder.
    #[inline(never)]
    fn record_to(self, status: labels::Status, code: labels::CodeLabel, end: Instant, span: &Span) {
        let seconds = Elapsed {
            start: self.start,
            end,
        };
        if !span.is_disabled() {
            span.record("status", status.span_text().as_ref());
            span.record("code", code.span_text().as_ref());
        }
        if self.target == Target::Nothing {
            return;
        }
        // The common case: every label value is indexed, and the keys were built by an
        // earlier call with the same values (see `labels::call_keys`).
        if let Some(keys) = labels::call_keys(self.kind, &self.pool, status, code) {
            if self.target == Target::Global {
                let (duration, responses) = keys.global_handles();
                duration.record(seconds);
                responses.increment(1);
                return;
            }
            metrics::with_recorder(|recorder| {
                let asked = Cell::new(false);
                recorder
                    .register_histogram(&keys.duration, &labels::METADATA)
                    .record(Probe {
                        value: seconds,
                        asked: &asked,
                    });
                recorder
                    .register_counter(&keys.responses, &labels::METADATA)
                    .increment(1);
                recorder::classify(recorder, asked.get());
            });
            return;
        }
        let kind = self.kind.as_str();
        let code = code.value().to_shared();
        metrics::histogram!(
            REQUEST_DURATION,
            LABEL_KIND => kind,
            LABEL_POOL => self.pool.to_shared(),
            LABEL_STATUS => status.value().to_shared(),
            LABEL_CODE => code.clone(),
        )
        .record(seconds);
        metrics::counter!(RESPONSES, LABEL_KIND => kind, LABEL_CODE => code).increment(1);
    }
}

/// Whether an answer with `code` shows that the pool of the call exists, so that its model may
/// take one of the places of models labelled by name ([`labels::settle_pool`]): a task was
/// created (0), or Kling counted the pool's running tasks (1303). Any other answer may come
/// before or without Kling looking at the model (auth, account, rate and content checks, a
/// 5xx), or says there is no such model (1201, 1202, 1203), so a mistyped model cannot take a
/// place; such calls are labelled `{product}:other`, as are a model's calls before its first
/// accepted create, unless the table is full and another layer gave the model a place (see
/// [`labels::settle_pool`]).
fn pool_shown(code: Code) -> bool {
    matches!(code.as_i64(), 0 | 1303)
}

/// How many requests a failed call sent towards Kling: a retry layer's count
/// ([`Attempts`]), less its last request when that never left; else one, or none for a request
/// refused in this process (a limiter's, the drain's refusal) or one that never left the client.
/// With the number of the attempt that ended the call, when a retry layer reported it (its
/// count, the last request included). The report is looked for through an `io::Error` or an
/// `Arc` an adapter wrapped it in, as kling-core reads a chain ([`kling_core::error::chain`]):
/// their own `source` skips it.
fn requests_sent(error: &(dyn StdError + 'static)) -> (u32, Option<u32>) {
    if let Some(attempts) =
        kling_core::error::chain(error).find_map(|link| link.downcast_ref::<Attempts>())
    {
        let last_unsent = SendState::of(attempts.last()) == SendState::NotSent;
        let sent = attempts.sent().saturating_sub(u32::from(last_unsent));
        return (sent, Some(attempts.sent()));
    }
    (u32::from(SendState::of(error) != SendState::NotSent), None)
}

/// An error's text with the credentials it may quote left out: a client's error can quote
/// the request it failed to send, headers and URL included. The credential after `Bearer`
/// (any case, also ending a longer word: `authorization=Bearer`) up to whatever ends a quoted
/// or listed value (a key may hold `:` or `!`), every JWT-shaped piece (`eyJ…`, three
/// dot-separated parts), also inside a longer word (`token=eyJ…`, `…/eyJ…`) or before a full
/// stop, the user and password of a URL (`https://user:pass@host`) and its query, fragment and
/// path parameters (a signed URL's signature, an `?api_key=`, a `#access_token=`, a
/// `;jsessionid=`) become `[redacted]`, sentence punctuation after the URL left outside.
/// Only worked out when the event is logged, over the text's first [`SHOWN_MAX`] bytes at
/// most ([`loggable`]). A bare API key quoted with none of these is not recognised: the layer
/// never sees the credentials (the auth layer sits below it).
struct Redacted<'a>(&'a (dyn StdError + 'static));

impl std::fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&loggable(&self.0.to_string()))
    }
}

/// [`Redacted`]'s rule over a text that is no error: an answer's message.
struct RedactedText<'a>(&'a str);

impl std::fmt::Display for RedactedText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&loggable(self.0))
    }
}

/// What stands for a credential.
const HIDDEN: &str = "[redacted]";

/// The most of one text (an answer's message, an error's text) a warning shows, in bytes. A
/// message is a sentence or two and an error's text a chain of them with a URL; a body may
/// carry up to 2 MiB of it (a broken proxy's page, a hostile upstream), which no log line
/// needs and which was redacted inside the response future's `poll`.
const SHOWN_MAX: usize = 4 * 1024;

/// `text` as a warning shows it: [`redact`]ed whole when it holds at most [`SHOWN_MAX`] bytes;
/// otherwise cut first, at the last white space at or before that many bytes, and the kept
/// part redacted, then ` [N bytes left out]`. The word the cut would split is left out whole
/// with the rest: half a URL's `user:pass` has no `@` yet, half a JWT fewer than three parts,
/// and either half would have been shown. Every credential the redaction hides ends at a white
/// space, so what a cut text shows is what the whole text shows up to that space. A text with
/// no white space in its first [`SHOWN_MAX`] bytes shows nothing but the count.
fn loggable(text: &str) -> String {
    if text.len() <= SHOWN_MAX {
        return redact(text);
    }
    let mut cut = SHOWN_MAX;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut kept = &text[..cut];
    if !text[cut..].starts_with(char::is_whitespace) {
        kept = kept.trim_end_matches(|c: char| !c.is_whitespace());
    }
    let kept = kept.trim_end();
    let mut shown = redact(kept);
    if !shown.is_empty() {
        shown.push(' ');
    }
    shown.push('[');
    shown.push_str(&(text.len() - kept.len()).to_string());
    shown.push_str(" bytes left out]");
    shown
}

#[cfg(test)]
thread_local! {
    /// Counts, in this crate's tests, the characters the redaction's scans read on this
    /// thread: what shows that each scan resumes where the last one stopped.
    static STEPS: Cell<usize> = const { Cell::new(0) };
}

/// Counts `n` characters read by a scan (tests only; nothing otherwise).
#[inline]
fn step(n: usize) {
    #[cfg(test)]
    STEPS.with(|steps| steps.set(steps.get() + n));
    #[cfg(not(test))]
    let _ = n;
}

/// `test`, counting each character it is asked about as read ([`step`]).
fn counted(test: impl Fn(char) -> bool) -> impl Fn(char) -> bool {
    move |c| {
        step(1);
        test(c)
    }
}

/// Where `needle` is in `text` from `from` on.
fn find_from(text: &str, from: usize, needle: &str) -> Option<usize> {
    let found = text[from..].find(needle);
    step(found.map_or(text.len() - from, |at| at + needle.len()));
    found.map(|at| from + at)
}

/// [`Redacted`]'s rule over `text`, in time linear in its length: each scan resumes where
/// the last one stopped.
fn redact(text: &str) -> String {
    let text = hide_url_secrets(text);
    let is_word = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
    // Where a credential after `Bearer` ends: a header value's end as a client quotes it.
    let ends_credential = |c: char| c.is_whitespace() || "\"'`\\,;)]}>".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut after_bearer = false;
    let mut rest = &*text;
    while let Some(start) = rest.find(counted(is_word)) {
        out.push_str(&rest[..start]);
        let word = &rest[start..];
        if after_bearer {
            let end = word.find(counted(ends_credential)).unwrap_or(word.len());
            out.push_str(HIDDEN);
            after_bearer = false;
            rest = &word[end..];
            continue;
        }
        let end = word.find(counted(|c| !is_word(c))).unwrap_or(word.len());
        let word = &word[..end];
        push_hiding_jwts(&mut out, word);
        after_bearer = ends_with_bearer(word);
        rest = &rest[start + end..];
    }
    out.push_str(rest);
    out
}

/// Whether `word` is `Bearer` (any case) or ends with it after a character that is no letter
/// or digit (`authorization=Bearer`).
fn ends_with_bearer(word: &str) -> bool {
    const BEARER: &str = "bearer";
    let Some(at) = word.len().checked_sub(BEARER.len()) else {
        return false;
    };
    word.is_char_boundary(at)
        && word[at..].eq_ignore_ascii_case(BEARER)
        && !word[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Pushes `word` with every JWT-shaped piece in it (a run of base64url parts joined by dots,
/// the first starting `eyJ`, three parts once trailing dots are left out) as [`HIDDEN`]. A run
/// is read once for all the `eyJ` in it (`eyJeyJeyJ…`): reading the rest of it again for
/// each made the time grow with the square of the word.
fn push_hiding_jwts(out: &mut String, word: &str) {
    let is_jwt_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let dots = |bytes: &[u8]| {
        step(bytes.len());
        bytes.iter().filter(|&&b| b == b'.').count()
    };
    let bytes = word.as_bytes();
    // `word[..shown]` is in `out`; the next `eyJ` is looked for from `from`.
    let (mut shown, mut from) = (0, 0);
    // The run the last `eyJ` was found in: where its token ends (trailing dots left out), and
    // the dots in the token from that `eyJ` on.
    let mut run: Option<(usize, usize, usize)> = None;
    while let Some(at) = find_from(word, from, "eyJ") {
        let (token_end, parted) = match run {
            // Only letters, digits, `-`, `_` and `.` since the last `eyJ`: the same run.
            Some((token_end, last, parted)) if at < token_end => {
                (token_end, parted - dots(&bytes[last..at]))
            }
            _ => {
                let len = bytes[at..]
                    .iter()
                    .position(|&b| !is_jwt_byte(b))
                    .unwrap_or(bytes.len() - at);
                step(len);
                let token = word[at..at + len].trim_end_matches('.');
                (at + token.len(), dots(token.as_bytes()))
            }
        };
        if parted == 2 {
            out.push_str(&word[shown..at]);
            out.push_str(HIDDEN);
            (shown, from) = (token_end, token_end);
            run = None;
        } else {
            from = at + 3;
            run = Some((token_end, at, parted));
        }
    }
    out.push_str(&word[shown..]);
}

/// `text` with the user and password (`scheme://user:pass@host`) and the query, fragment and
/// path parameters (`?X-Amz-Signature=…`, `?api_key=…`, `#access_token=…`, `;jsessionid=…`:
/// a signed URL's or a session's credential) of every URL in it hidden. A run of text that
/// holds several `://` (`a://b://c`) is read once for all of them ([`UrlRun`]).
fn hide_url_secrets(text: &str) -> std::borrow::Cow<'_, str> {
    let Some(first) = find_from(text, 0, "://") else {
        return std::borrow::Cow::Borrowed(text);
    };
    // Not at a `)` or `'`: a password may hold them (RFC 3986), and was shown whole.
    let ends_authority = |c: char| c.is_whitespace() || "/?#\"`\\<>]}".contains(c);
    let mut out = String::with_capacity(text.len());
    // `text[..shown]` is in `out`.
    let mut shown = 0;
    let mut next = Some(first);
    let mut last_run: Option<UrlRun> = None;
    while let Some(at) = next {
        let mut tail = at + 3;
        // Each authority ends at the next `://`'s `/` at the latest: none is read twice.
        let authority_len = text[tail..]
            .find(counted(ends_authority))
            .unwrap_or(text.len() - tail);
        step(authority_len);
        if let Some(user_end) = text[tail..tail + authority_len].rfind('@') {
            out.push_str(&text[shown..tail]);
            out.push_str(HIDDEN);
            tail += user_end;
            shown = tail;
        }
        let mut run = match last_run.take() {
            Some(run) if run.holds(tail) => run,
            _ => UrlRun::new(text, tail),
        };
        // A query, a fragment (`#access_token=`) or path parameters (`;jsessionid=`): each
        // may hold a credential. Only the host is before them here, and it holds none of them.
        let mut from = tail;
        if let Some(at) = run.query(text, tail) {
            let url_end = run.url_end(text, tail);
            if at < url_end {
                out.push_str(&text[shown..=at]);
                // A bare `#` ending the URL hides nothing (a `?` or `;` there is punctuation,
                // left out by `url_end`).
                if at + 1 < url_end {
                    out.push_str(HIDDEN);
                }
                (shown, from) = (url_end, url_end);
            }
        }
        last_run = Some(run);
        next = find_from(text, from, "://");
    }
    out.push_str(&text[shown..]);
    std::borrow::Cow::Owned(out)
}

/// A run of text from a URL's start (after its `://`, or at the `@` ending its user) up to
/// whatever ends a URL in it, read once for all the URLs that start in it: `a://b://c`
/// holds two, and reading the rest of the run again for each made the time grow with the
/// square of the text.
///
/// How much of the text from `t` is the URL ([`UrlRun::url_end`]), as autolinkers read one:
/// up to a space, a `"` or `` ` ``, `<`, `>` or `\` (an escaped quote), none of which a URL
/// holds, then without what ends it in prose, from the end: a run of sentence punctuation
/// (`.`, `,`, `:`, `;`, `!`, `?`, so a full stop is not hidden with the query), and a `)`,
/// `]`, `}` or `'` that closes no bracket or quote of the URL's own (`(see https://…)`).
/// Inside the URL none of them ends it (`/wiki/Foo_(bar)?…`, `?a=b)&sig=…`, `?filter[key]=…`,
/// `?name=O'Brien&sig=…`): the rest of its query was shown. A run of punctuation that is a
/// whole value (`?pw=!!`) stays in; at most a value's last punctuation shows, never a letter
/// or digit of it.
///
/// Only the run's closing part (from [`UrlRun::closing`], nothing but those characters) can
/// be left out, and what is depends on the URL's start only through how many `'` and
/// brackets it holds before that part: those are counted once, and what goes before each new
/// start is taken off.
struct UrlRun {
    /// Where the first URL read in the run starts.
    start: usize,
    /// Where the run ends: a space, `"`, `` ` ``, `<`, `>`, `\` or the end of the text.
    end: usize,
    /// Where the run's closing part starts: from here to `end` only `'`, `)`, `]`, `}` and
    /// sentence punctuation; the byte before it (from `start` on) is none of them.
    closing: usize,
    /// How far the closing part goes at least, for a URL starting before it: past a run of
    /// sentence punctuation that starts it after a `=` (that run is a value, `?pw=!!`).
    floor: usize,
    /// The `'` in the closing part, and where its last two are.
    closing_quotes: (usize, [usize; 2]),
    /// Where the closing part's `)`, `]` and `}` are, each kind last first.
    closing_brackets: [Vec<usize>; 3],
    /// Where the counts below start (a URL's start); they end at `closing`.
    counts_from: usize,
    /// The `'` in `counts_from..closing`.
    quotes: usize,
    /// The `)` and `(`, `]` and `[`, `}` and `{` in `counts_from..closing`.
    brackets: [(usize, usize); 3],
    /// The first `?`, `#` or `;` at or after the last URL's start, or `end`.
    query: usize,
}

impl UrlRun {
    const BRACKETS: [[u8; 2]; 3] = [*b"()", *b"[]", *b"{}"];

    /// Reads the run from `start`.
    fn new(text: &str, start: usize) -> Self {
        let ends_url = |c: char| c.is_whitespace() || "\"`\\<>".contains(c);
        let is_sentence_punctuation = |b: u8| matches!(b, b'.' | b',' | b':' | b';' | b'!' | b'?');
        let bytes = text.as_bytes();
        let end = text[start..]
            .find(counted(ends_url))
            .map_or(text.len(), |at| start + at);
        let mut closing = end;
        let mut closing_quotes = (0, [0; 2]);
        let mut closing_brackets: [Vec<usize>; 3] = Default::default();
        while closing > start {
            let b = bytes[closing - 1];
            if b == b'\'' {
                if let Some(slot) = closing_quotes.1.get_mut(closing_quotes.0) {
                    *slot = closing - 1;
                }
                closing_quotes.0 += 1;
            } else if let Some(kind) = Self::BRACKETS.iter().position(|pair| pair[1] == b) {
                closing_brackets[kind].push(closing - 1);
            } else if !is_sentence_punctuation(b) {
                break;
            }
            closing -= 1;
        }
        step(end - closing);
        let mut floor = closing;
        if closing > start && bytes[closing - 1] == b'=' {
            let values = bytes[closing..end]
                .iter()
                .take_while(|&&b| is_sentence_punctuation(b))
                .count();
            step(values);
            floor += values;
        }
        let mut run = Self {
            start,
            end,
            closing,
            floor,
            closing_quotes,
            closing_brackets,
            counts_from: start,
            quotes: 0,
            brackets: [(0, 0); 3],
            query: start,
        };
        run.count(&bytes[start..closing], |n| n + 1);
        run.query = run.find_query(bytes, start);
        run
    }

    /// Whether a URL starting at `t` is read in this run (`t` is at or after the last
    /// URL's start). One that starts in the run never starts past its closing part's start:
    /// the `/` before it, or its `@`, is none of that part's characters.
    fn holds(&self, t: usize) -> bool {
        self.start <= t && t <= self.closing
    }

    /// Changes the counts by the `'` and brackets in `bytes`.
    fn count(&mut self, bytes: &[u8], change: impl Fn(usize) -> usize) {
        step(bytes.len());
        for &b in bytes {
            if b == b'\'' {
                self.quotes = change(self.quotes);
            }
            for (pair, (closings, openings)) in Self::BRACKETS.iter().zip(&mut self.brackets) {
                if b == pair[1] {
                    *closings = change(*closings);
                } else if b == pair[0] {
                    *openings = change(*openings);
                }
            }
        }
    }

    /// The first `?`, `#` or `;` in `from..end`, or `end`.
    fn find_query(&self, bytes: &[u8], from: usize) -> usize {
        let found = bytes[from..self.end]
            .iter()
            .position(|b| matches!(b, b'?' | b'#' | b';'));
        step(found.map_or(self.end - from, |at| at + 1));
        found.map_or(self.end, |at| from + at)
    }

    /// The first `?`, `#` or `;` of the URL starting at `t`, if it has one before the run's
    /// end (`t` at or after the last URL's start).
    fn query(&mut self, text: &str, t: usize) -> Option<usize> {
        if self.query < t {
            self.query = self.find_query(text.as_bytes(), t);
        }
        (self.query < self.end).then_some(self.query)
    }

    /// Where the URL starting at `t` ends (`t` at or after the last URL's start, and held).
    fn url_end(&mut self, text: &str, t: usize) -> usize {
        debug_assert!(self.holds(t) && self.counts_from <= t);
        let before = self.counts_from..t;
        self.count(&text.as_bytes()[before], |n| n - 1);
        self.counts_from = t;
        // From the end: a `'` goes while the URL holds an odd number of them, so the last one
        // goes when it does and the one before it never does; a `)` goes while the URL holds
        // more of them than `(`, so the closing part's last ones go, one for each the URL holds
        // over its `(`, and the next one stays. A punctuation run goes unless a `=` is before
        // it; anything else stays.
        let mut end = if t < self.closing {
            self.floor
        } else {
            self.closing
        };
        let (quotes, last_quotes) = self.closing_quotes;
        let odd = (self.quotes + quotes) % 2 == 1;
        if let Some(&at) = last_quotes[..quotes.min(2)].get(usize::from(odd)) {
            end = end.max(at + 1);
        }
        for (kind, &(closings, openings)) in self.closing_brackets.iter().zip(&self.brackets) {
            let unmatched = (closings + kind.len()).saturating_sub(openings);
            if let Some(&at) = kind.get(unmatched) {
                end = end.max(at + 1);
            }
        }
        end
    }
}

/// Warns of a response whose code is not success (out of line: the success path needs none
/// of it).
#[cold]
#[inline(never)]
fn failed(outcome: &Outcome, status: StatusCode) {
    tracing::warn!(
        target: "kling_metrics",
        code = outcome.code().as_i64(),
        http_status = status.as_u16(),
        // The upstream's text: a gateway may quote the credential it refused. Not `message`:
        // that is the event's own ("kling call failed"), and a second field of the same name
        // came out as a duplicate key in JSON logs.
        kling_message = %RedactedText(outcome.message()),
        request_id = outcome.request_id(),
        "kling call failed"
    );
}

/// Warns of a call that ended in an error, with the Kling answer it carries (a retry layer's
/// "gave up" on a 1302 or 1303) in the fields [`failed`] gives an answered one: the error's
/// text alone left a log line no `code` to filter or alert on (the span's is recorded after
/// this event).
#[cold]
#[inline(never)]
fn gave_up(error: &(dyn StdError + 'static), cause: Option<&Cause<'_>>) {
    let (api, status) = match cause {
        Some(Cause::Api(api)) => (Some(*api), Some(api.status())),
        Some(Cause::Malformed(status)) => (None, Some(*status)),
        None => (None, None),
    };
    tracing::warn!(
        target: "kling_metrics",
        code = api.map(|api| api.code().as_i64()),
        http_status = status.map(|status| status.as_u16()),
        kling_message = api.map(|api| tracing::field::display(RedactedText(api.message()))),
        request_id = api.and_then(ApiError::request_id),
        error = %Redacted(error),
        "kling call failed"
    );
}

/// A call's duration in seconds, worked out only when a histogram records it: a no-op
/// recorder's handle never asks, which saves an instant subtraction per call.
struct Elapsed {
    start: Instant,
    end: Instant,
}

impl metrics::IntoF64 for Elapsed {
    fn into_f64(self) -> f64 {
        self.end.saturating_duration_since(self.start).as_secs_f64()
    }
}

/// What an error says about the server's answer, if it came from one.
enum Cause<'a> {
    Api(&'a ApiError),
    Malformed(StatusCode),
}

/// Walks the source chain for a Kling error or a response that was not one.
fn find_cause<'a>(error: &'a (dyn StdError + 'static)) -> Option<Cause<'a>> {
    // Through an `io::Error` or `Arc` wrapping too, as kling-core reads a chain.
    kling_core::error::chain(error).find_map(|err| {
        if let Some(api) = err.downcast_ref::<ApiError>() {
            return Some(Cause::Api(api));
        }
        if let Some(malformed) = err.downcast_ref::<MalformedResponse>() {
            return Some(Cause::Malformed(malformed.status()));
        }
        err.downcast_ref::<BodyTooLarge>()
            .map(|large| Cause::Malformed(large.status()))
    })
}

#[cfg(test)]
mod tests {
    //! The duration histogram runs from `call` to the arrival of the final response, read from
    //! the classify step's `Outcome::received_at` (one clock read per call), or the clock when
    //! that is older than the call.

    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;
    use kling_core::ClassifyLayer;
    use kling_core::error::BoxError;
    use kling_core::metrics::REQUEST_DURATION;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use tokio::time::{Instant, advance, sleep};
    use tower::{Layer, ServiceExt, service_fn};

    use super::*;
    use crate::MetricsLayer;

    const OK: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":null}"#;

    fn ok() -> Response<Full<Bytes>> {
        Response::new(Full::new(Bytes::from_static(OK.as_bytes())))
    }

    fn query() -> http::Request<Full<Bytes>> {
        http::Request::get("/v1/videos/text2video/1")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    /// Sends `request` through `service` with a fresh recorder; returns the one duration.
    async fn duration<S>(service: S) -> f64
    where
        S: tower_service::Service<
                http::Request<Full<Bytes>>,
                Response = Response<Full<Bytes>>,
                Error = BoxError,
            >,
    {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let _ = service.oneshot(query()).await;
        let samples: Vec<f64> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == REQUEST_DURATION)
            .flat_map(|(.., value)| match value {
                DebugValue::Histogram(samples) => samples.into_iter().map(|s| s.into_inner()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(samples.len(), 1, "{samples:?}");
        samples[0]
    }

    #[tokio::test(start_paused = true)]
    async fn the_duration_runs_from_call_to_the_arrival_of_the_response() {
        let slow = service_fn(|_req: http::Request<Full<Bytes>>| async {
            sleep(Duration::from_secs(3)).await;
            Ok::<_, BoxError>(ok())
        });
        let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(slow));
        assert_eq!(duration(stack).await, 3.0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_classify_step_the_layer_reads_the_response_when_it_arrives() {
        let slow = service_fn(|_req: http::Request<Full<Bytes>>| async {
            sleep(Duration::from_secs(2)).await;
            Ok::<_, BoxError>(ok())
        });
        assert_eq!(duration(MetricsLayer::new().layer(slow)).await, 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_read_before_the_call_is_timed_by_the_clock() {
        // A response replayed from a cache: its outcome was read 5 s before the call.
        let mut cached = ok();
        let outcome = Outcome::parse(
            StatusCode::OK,
            cached.headers(),
            OK.as_bytes(),
            Instant::now(),
        )
        .unwrap();
        cached.extensions_mut().insert(outcome);
        advance(Duration::from_secs(5)).await;
        let replay = service_fn(move |_req: http::Request<Full<Bytes>>| {
            let cached = cached.clone();
            async move {
                sleep(Duration::from_secs(2)).await;
                Ok::<_, BoxError>(cached)
            }
        });
        // 2 s, not the 0 s a duration up to the outcome's read would give.
        assert_eq!(duration(MetricsLayer::new().layer(replay)).await, 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_elapsed_seconds_are_worked_out_on_demand_and_never_negative() {
        use metrics::IntoF64;
        let start = Instant::now();
        let end = start + Duration::from_millis(1500);
        assert_eq!(Elapsed { start, end }.into_f64(), 1.5);
        assert_eq!(
            Elapsed {
                start: end,
                end: start
            }
            .into_f64(),
            0.0
        );
    }

    #[test]
    fn redaction_hides_bearer_tokens_and_jwts_and_keeps_the_rest() {
        assert_eq!(
            redact("send failed: {\"authorization\": \"Bearer ak-9f.8e/7d=\"}, retry"),
            "send failed: {\"authorization\": \"Bearer [redacted]\"}, retry"
        );
        assert_eq!(
            redact("token eyJhbGci.eyJpc3Mi.c2lnbmF0 expired; bearer:  x"),
            "token [redacted] expired; bearer:  [redacted]"
        );
        assert_eq!(redact("connection refused"), "connection refused");
        assert_eq!(redact(""), "");
    }

    /// A credential quoted in a shape other than a lone word: a JWT after `=` or `/`, or
    /// before a full stop; a key holding punctuation; `Bearer` ending a longer word; a URL's
    /// user and password.
    #[test]
    fn redaction_hides_credentials_joined_to_other_text() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJhayJ9.c2lnbmF0dXJl";
        for (quoted, shown) in [
            (
                format!("token={jwt}&a=b"),
                "token=[redacted]&a=b".to_owned(),
            ),
            (
                format!("url /cb/{jwt}?x"),
                "url /cb/[redacted]?x".to_owned(),
            ),
            (
                format!("invalid token {jwt}."),
                "invalid token [redacted].".to_owned(),
            ),
            (
                "authorization: Bearer ak:live!9f8e, next".to_owned(),
                "authorization: Bearer [redacted], next".to_owned(),
            ),
            (
                "authorization=Bearer ak-live-9f8e".to_owned(),
                "authorization=Bearer [redacted]".to_owned(),
            ),
            (
                "error sending request for url (https://user:pa55@proxy:8080/v1/x)".to_owned(),
                "error sending request for url (https://[redacted]@proxy:8080/v1/x)".to_owned(),
            ),
        ] {
            assert_eq!(redact(&quoted), shown, "{quoted}");
        }
        // Words that only look alike are kept.
        for kept in [
            "keyJar eyJa.b unbearer x",
            "https://host/path user@example.com",
            "é eyJ",
        ] {
            assert_eq!(redact(kept), kept);
        }
    }

    /// A URL's secret may follow a `#` (an OAuth `#access_token=`) or a `;` (a servlet's
    /// `;jsessionid=`), not only a `?`; a `?` or `;` that ends a sentence after a URL hides
    /// nothing; URLs next to each other, at the end, or with non-ASCII text around them keep
    /// the rest of the line.
    #[test]
    fn redaction_hides_every_url_secret_and_cuts_nothing_else() {
        for (quoted, shown) in [
            (
                "callback https://app.example/cb#access_token=s3cr3t&x=1 failed",
                "callback https://app.example/cb#[redacted] failed",
            ),
            (
                "GET https://app.example/a;jsessionid=s3cr3t/b: 500",
                "GET https://app.example/a;[redacted]: 500",
            ),
            (
                "could not read https://cdn.example/a.png? is it public; retry",
                "could not read https://cdn.example/a.png? is it public; retry",
            ),
            (
                "tried https://a.example/x; then gave up",
                "tried https://a.example/x; then gave up",
            ),
            (
                "é https://a.example/x?sig=s3cr3t é https://b.example/y?k=s3cr3t",
                "é https://a.example/x?[redacted] é https://b.example/y?[redacted]",
            ),
            (
                "ends at https://a.example/é?sig=s3cr3t",
                "ends at https://a.example/é?[redacted]",
            ),
            (
                "ends at https://a.example/x?",
                "ends at https://a.example/x?",
            ),
        ] {
            let redacted = redact(quoted);
            assert!(!redacted.contains("s3cr3t"), "{quoted} -> {redacted}");
            assert_eq!(redacted, shown, "{quoted}");
        }
    }

    /// Sentence punctuation right after a URL is prose, as autolinkers read it: a trailing run
    /// of `.`, `,`, `:`, `;`, `!` or `?` stays outside `[redacted]` (a full stop was
    /// swallowed), while a dot inside the query (`?a=b.c`), or ending a value that more of the
    /// query follows (`?a=b.&c=d`), is redacted with the rest.
    #[test]
    fn redaction_leaves_sentence_punctuation_after_a_url_outside() {
        for (quoted, shown) in [
            (
                "could not read https://a.example/x?sig=s3cr3t.",
                "could not read https://a.example/x?[redacted].",
            ),
            (
                "could not read https://a.example/x?sig=s3cr3t.c",
                "could not read https://a.example/x?[redacted]",
            ),
            (
                "could not read https://a.example/x?sig=s3cr3t.c. Retry",
                "could not read https://a.example/x?[redacted]. Retry",
            ),
            (
                "could not read https://a.example/x?sig=s3cr3t...",
                "could not read https://a.example/x?[redacted]...",
            ),
            (
                "(see https://a.example/x?sig=s3cr3t.)",
                "(see https://a.example/x?[redacted].)",
            ),
            (
                "read https://a.example/x?a=s3cr3t.&b=s3cr3t. Retry",
                "read https://a.example/x?[redacted]. Retry",
            ),
            (
                "https://a.example/x?sig=s3cr3t, https://b.example/y#k=s3cr3t!",
                "https://a.example/x?[redacted], https://b.example/y#[redacted]!",
            ),
            (
                "tried https://a.example/x;jsessionid=s3cr3t: refused",
                "tried https://a.example/x;[redacted]: refused",
            ),
            (
                "is it https://a.example/x?sig=s3cr3t?",
                "is it https://a.example/x?[redacted]?",
            ),
            (
                "ends at https://a.example/x?.",
                "ends at https://a.example/x?.",
            ),
            (
                "ends at https://a.example/a.png.",
                "ends at https://a.example/a.png.",
            ),
        ] {
            let redacted = redact(quoted);
            assert!(!redacted.contains("s3cr3t"), "{quoted} -> {redacted}");
            assert_eq!(redacted, shown, "{quoted}");
        }
    }

    /// A `)` ends a URL only when it closes no `(` of the URL's own, as autolinkers read
    /// one: a path with parentheses (`/wiki/Foo_(bar)`) ended the URL there, and its query
    /// was shown whole.
    #[test]
    fn redaction_reads_a_url_past_parentheses_of_its_own() {
        for (quoted, shown) in [
            (
                "GET https://a.example/wiki/Foo_(bar)?sig=s3cr3t failed",
                "GET https://a.example/wiki/Foo_(bar)?[redacted] failed",
            ),
            (
                "(see https://a.example/wiki/Foo_(bar)?sig=s3cr3t).",
                "(see https://a.example/wiki/Foo_(bar)?[redacted]).",
            ),
            (
                "url (https://a.example/x?sig=s3cr3t) failed",
                "url (https://a.example/x?[redacted]) failed",
            ),
        ] {
            let redacted = redact(quoted);
            assert!(!redacted.contains("s3cr3t"), "{quoted} -> {redacted}");
            assert_eq!(redacted, shown, "{quoted}");
        }
    }

    /// A `)`, `]`, `}` or `'` inside a URL that closes nothing of its own (`?a=b)&…`,
    /// `?filter[key]=…`, `?name=O'Brien&…`) does not end it: only an unmatched one at its end
    /// does, as autolinkers read one. Ending the URL there showed the rest of its query whole,
    /// a second parameter's signature and all.
    #[test]
    fn redaction_reads_a_url_past_a_closing_bracket_inside_it() {
        for (quoted, shown) in [
            (
                "GET https://a.example/x?a=b)&sig=s3cr3t failed",
                "GET https://a.example/x?[redacted] failed",
            ),
            (
                "GET https://a.example/x?filter[key]=s3cr3t failed",
                "GET https://a.example/x?[redacted] failed",
            ),
            (
                "GET https://a.example/x?a=b}&sig=s3cr3t failed",
                "GET https://a.example/x?[redacted] failed",
            ),
            (
                "GET https://a.example/x?name=O'Brien&sig=s3cr3t failed",
                "GET https://a.example/x?[redacted] failed",
            ),
            // The control: an unmatched one ending the URL is the text's own.
            (
                "[see https://a.example/x?sig=s3cr3t], {https://a.example/y#k=s3cr3t}",
                "[see https://a.example/x?[redacted]], {https://a.example/y#[redacted]}",
            ),
            (
                "{'url': 'https://a.example/x?sig=s3cr3t'}, 'https://b.example/y#k=s3cr3t'.",
                "{'url': 'https://a.example/x?[redacted]'}, 'https://b.example/y#[redacted]'.",
            ),
            (
                "[link](https://a.example/x?sig=s3cr3t): refused",
                "[link](https://a.example/x?[redacted]): refused",
            ),
        ] {
            let redacted = redact(quoted);
            assert!(!redacted.contains("s3cr3t"), "{quoted} -> {redacted}");
            assert_eq!(redacted, shown, "{quoted}");
        }
    }

    /// A value that is nothing but punctuation (`?pw=!!`) is the value, not prose after the
    /// URL: it is hidden whole, where trimming sentence punctuation showed it.
    #[test]
    fn redaction_hides_a_value_that_is_all_punctuation() {
        for (quoted, shown) in [
            (
                "GET https://a.example/x?pw=!?.",
                "GET https://a.example/x?[redacted]",
            ),
            (
                "GET https://a.example/x?a=b&pw=!!, then",
                "GET https://a.example/x?[redacted] then",
            ),
            // The control: after a value with more in it, the run is prose.
            (
                "GET https://a.example/x?pw=b!!, then",
                "GET https://a.example/x?[redacted]!!, then",
            ),
        ] {
            assert_eq!(redact(quoted), shown, "{quoted}");
        }
    }

    /// A URL's password may hold `)` or `'` (RFC 3986 lets them in a user info): neither ends
    /// the part before the `@`, which was shown whole.
    #[test]
    fn redaction_hides_a_password_holding_a_parenthesis_or_quote() {
        for (quoted, shown) in [
            (
                "proxy https://user:pa)s3cr3t@proxy.example:8080/v1 refused",
                "proxy https://[redacted]@proxy.example:8080/v1 refused",
            ),
            (
                "proxy https://user:pa's3cr3t@proxy.example/v1 refused",
                "proxy https://[redacted]@proxy.example/v1 refused",
            ),
        ] {
            let redacted = redact(quoted);
            assert!(!redacted.contains("s3cr3t"), "{quoted} -> {redacted}");
            assert_eq!(redacted, shown, "{quoted}");
        }
    }

    /// The text `head` and `tail` fill, `len` bytes each, and the scans' work redacting it.
    fn redaction_work(head: &str, tail: &str, len: usize) -> usize {
        let mut text = head.repeat(len / head.len());
        if !tail.is_empty() {
            text.push_str(&tail.repeat(len / tail.len()));
        }
        STEPS.with(|steps| steps.set(0));
        assert!(!redact(&text).is_empty());
        STEPS.with(Cell::get)
    }

    /// Each of the redaction's scans resumes where the last one stopped: a text full of `://`
    /// or `eyJ` (a broken proxy's page, a hostile upstream) was read again from each of them
    /// to its end, and 128 KiB of `://` blocked a runtime worker for minutes. 16 times the
    /// text is at most 20 times the work, not 256 times.
    #[test]
    fn redaction_reads_the_text_a_bounded_number_of_times() {
        for (head, tail) in [
            ("eyJ", ""),
            ("eyJ.", ""),
            ("eyJa.", "."),
            ("://", ""),
            ("a://b@", ""),
            ("://x", "?"),
            ("://(", ")"),
            ("://'", "'"),
            ("://a=", ".)"),
            ("https://a.example/x?", "'])},.:;!?"),
            ("Bearer ", ""),
            ("a ", ""),
        ] {
            let small = redaction_work(head, tail, 4 * 1024);
            let large = redaction_work(head, tail, 64 * 1024);
            assert!(
                large <= 20 * small,
                "{head:?} + {tail:?}: 16 times the text took {:.1} times the work \
                 ({small} -> {large} characters read)",
                large as f64 / small as f64
            );
        }
    }

    /// A small generator of texts for comparing the redaction with the one it replaced:
    /// pieces that make and end URLs, JWTs and credentials, in a fixed pseudo-random order.
    struct Texts(u64);

    impl Texts {
        const PIECES: [&'static str; 44] = [
            "://",
            "://",
            "eyJ",
            "eyJ",
            "e",
            "J",
            ".",
            ".",
            "@",
            "?",
            "#",
            ";",
            "'",
            "(",
            ")",
            "[",
            "]",
            "{",
            "}",
            ",",
            ":",
            "!",
            "=",
            " ",
            " ",
            "a",
            "b1",
            "é",
            "/",
            "Bearer",
            "\"",
            "`",
            "\\",
            "<",
            ">",
            "\u{a0}",
            "-",
            "_",
            "&",
            "~",
            "+",
            "eyJa.b.c",
            "https://u:p@h/x?s=1",
            "bearer:",
        ];

        fn next(&mut self) -> u64 {
            // xorshift64
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn text(&mut self) -> String {
            let len = self.next() % 24;
            (0..len)
                .map(|_| Self::PIECES[(self.next() % Self::PIECES.len() as u64) as usize])
                .collect()
        }
    }

    /// The linear scans hide exactly what the ones they replaced hid, and show the rest
    /// alike, over 200,000 texts made of the pieces every rule reads.
    #[test]
    fn redaction_hides_what_the_rescanning_redaction_hid() {
        let mut texts = Texts(0x9e37_79b9_7f4a_7c15);
        for _ in 0..200_000 {
            let text = texts.text();
            assert_eq!(redact(&text), before::redact(&text), "{text:?}");
            let mut jwts = String::new();
            push_hiding_jwts(&mut jwts, &text);
            let mut before_jwts = String::new();
            before::push_hiding_jwts(&mut before_jwts, &text);
            assert_eq!(jwts, before_jwts, "{text:?}");
        }
    }

    /// The redaction as it was before its scans were made linear (each rescanned the rest of
    /// the text from every `://` and `eyJ`): what the new one is compared with.
    mod before {
        use super::super::{HIDDEN, ends_with_bearer};

        pub(super) fn redact(text: &str) -> String {
            let text = hide_url_secrets(text);
            let is_word = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
            let ends_credential = |c: char| c.is_whitespace() || "\"'`\\,;)]}>".contains(c);
            let mut out = String::with_capacity(text.len());
            let mut after_bearer = false;
            let mut rest = &*text;
            while let Some(start) = rest.find(is_word) {
                out.push_str(&rest[..start]);
                let word = &rest[start..];
                if after_bearer {
                    let end = word.find(ends_credential).unwrap_or(word.len());
                    out.push_str(HIDDEN);
                    after_bearer = false;
                    rest = &word[end..];
                    continue;
                }
                let end = word.find(|c: char| !is_word(c)).unwrap_or(word.len());
                let word = &word[..end];
                push_hiding_jwts(&mut out, word);
                after_bearer = ends_with_bearer(word);
                rest = &rest[start + end..];
            }
            out.push_str(rest);
            out
        }

        pub(super) fn push_hiding_jwts(out: &mut String, word: &str) {
            let is_jwt_char =
                |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
            let mut rest = word;
            while let Some(at) = rest.find("eyJ") {
                let run = &rest[at..];
                let len = run.find(|c: char| !is_jwt_char(c)).unwrap_or(run.len());
                let token = run[..len].trim_end_matches('.');
                if token.split('.').count() == 3 {
                    out.push_str(&rest[..at]);
                    out.push_str(HIDDEN);
                    rest = &run[token.len()..];
                } else {
                    out.push_str(&rest[..at + 3]);
                    rest = &run[3..];
                }
            }
            out.push_str(rest);
        }

        fn hide_url_secrets(text: &str) -> std::borrow::Cow<'_, str> {
            if !text.contains("://") {
                return std::borrow::Cow::Borrowed(text);
            }
            let ends_authority = |c: char| c.is_whitespace() || "/?#\"`\\<>]}".contains(c);
            let mut out = String::with_capacity(text.len());
            let mut rest = text;
            while let Some(at) = rest.find("://") {
                let (head, tail) = rest.split_at(at + 3);
                out.push_str(head);
                let authority = &tail[..tail.find(ends_authority).unwrap_or(tail.len())];
                let tail = match authority.rfind('@') {
                    Some(user_end) => {
                        out.push_str(HIDDEN);
                        &tail[user_end..]
                    }
                    None => tail,
                };
                let url_end = url_len(tail);
                match tail[..url_end].find(['?', '#', ';']) {
                    Some(at) => {
                        out.push_str(&tail[..=at]);
                        if at + 1 < url_end {
                            out.push_str(HIDDEN);
                        }
                        rest = &tail[url_end..];
                    }
                    None => rest = tail,
                }
            }
            out.push_str(rest);
            std::borrow::Cow::Owned(out)
        }

        fn url_len(tail: &str) -> usize {
            let ends_url = |c: char| c.is_whitespace() || "\"`\\<>".contains(c);
            let mut url = &tail[..tail.find(ends_url).unwrap_or(tail.len())];
            let count = |url: &str, c: u8| url.bytes().filter(|&b| b == c).count();
            let mut quotes = count(url, b'\'');
            let mut brackets = [b"()", b"[]", b"{}"]
                .map(|&[open, close]| (close, count(url, close), count(url, open)));
            while let Some(&last) = url.as_bytes().last() {
                if last == b'\'' {
                    if quotes % 2 == 0 {
                        break;
                    }
                    quotes -= 1;
                    url = &url[..url.len() - 1];
                    continue;
                }
                if let Some((_, closings, openings)) = brackets.iter_mut().find(|b| b.0 == last) {
                    if *closings <= *openings {
                        break;
                    }
                    *closings -= 1;
                    url = &url[..url.len() - 1];
                    continue;
                }
                let prose = url.trim_end_matches(['.', ',', ':', ';', '!', '?']);
                if prose.len() == url.len() || prose.ends_with('=') {
                    break;
                }
                url = prose;
            }
            url.len()
        }
    }

    /// `len` bytes of words, each followed by a space.
    fn words(len: usize) -> String {
        let mut text = "o".repeat(len % 3);
        text.push_str(&"ok ".repeat(len / 3));
        text
    }

    /// A text over [`SHOWN_MAX`] bytes is cut at the last white space at or before that many
    /// bytes, on a character's boundary, and says how many bytes it left out; up to that
    /// many it is shown whole. What is kept is still redacted.
    #[test]
    fn a_long_text_is_cut_at_a_space_and_says_what_it_left_out() {
        let whole = words(SHOWN_MAX);
        assert_eq!(loggable(&whole), whole);
        // Cut at the space after the kept word.
        let text = format!("{}{}", "a".repeat(SHOWN_MAX), " more words");
        assert_eq!(
            loggable(&text),
            format!("{} [11 bytes left out]", "a".repeat(SHOWN_MAX))
        );
        // The cut falls inside `é` inside a word: the word goes whole.
        let text = format!("{} é{}", "a".repeat(SHOWN_MAX - 2), "é".repeat(10));
        assert!(!text.is_char_boundary(SHOWN_MAX));
        assert_eq!(
            loggable(&text),
            format!("{} [23 bytes left out]", "a".repeat(SHOWN_MAX - 2))
        );
        // No white space: nothing but the count.
        let text = "é".repeat(3000);
        assert_eq!(loggable(&text), "[6000 bytes left out]");
        // 2 MiB of `://` and words: the kept part redacted, the size bounded.
        let secret = "see https://u:s3cr3t@h.example/x?sig=s3cr3t ";
        let text = format!("{secret}{}", "a://b c ".repeat(256 * 1024));
        let shown = loggable(&text);
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(
            shown.starts_with("see https://[redacted]@h.example/x?[redacted] a://b c "),
            "{shown}"
        );
        let kept = text[..SHOWN_MAX].trim_end_matches(|c| c != ' ').trim_end();
        let left_out = text.len() - kept.len();
        assert!(left_out > 2 * 1024 * 1024 - SHOWN_MAX, "{left_out}");
        assert_eq!(
            shown,
            format!("{} [{left_out} bytes left out]", redact(kept))
        );
        assert!(shown.len() <= SHOWN_MAX + 32, "{}", shown.len());
    }

    /// A credential the cut falls in is left out whole, not shown in part: half a URL's
    /// `user:pass` has no `@` yet and half a JWT fewer than three parts, and the redaction
    /// would have shown either. Whatever the cut leaves of it, the warning shows the words
    /// before it and the count.
    #[test]
    fn a_credential_across_the_cut_is_left_out_whole() {
        let jwt = "eyJQQQQQQQQ.eyJQQQQQQQQQQQQ.QQQQQQQQ";
        for secret in [
            "https://user:QQQQQQQQ@proxy.example:8080/v1".to_owned(),
            "https://a.example/x.png?X-Sig=QQQQQQQQ&k=QQQQ".to_owned(),
            "https://a.example/cb#access_token=QQQQQQQQ".to_owned(),
            jwt.to_owned(),
            format!("token={jwt}"),
            format!("/cb/{jwt}?x"),
            "Bearer QQQQQQQQ".to_owned(),
            "authorization=Bearer QQ:QQ!QQQQ".to_owned(),
        ] {
            // The cut falls at each byte of the secret.
            for inside in 1..secret.len() {
                let before = words(SHOWN_MAX - inside);
                let text = format!("{before}{secret} and after");
                let shown = loggable(&text);
                assert!(!shown.contains('Q'), "{secret} cut after {inside}: {shown}");
                // The words before the one cut (`Bearer` too, when the cut is at its
                // space), redacted, and the count.
                let cut = SHOWN_MAX;
                let kept = match text[cut..].starts_with(' ') {
                    true => &text[..cut],
                    false => &text[..text[..cut].rfind(' ').unwrap()],
                };
                let kept = kept.trim_end();
                let left_out = text.len() - kept.len();
                assert_eq!(
                    shown,
                    format!("{} [{left_out} bytes left out]", redact(kept)),
                    "{secret} cut after {inside}"
                );
            }
        }
    }

    /// How long `redact` takes over 128 KiB of `eyJ` and of `://`: a measurement, run with
    /// `cargo test -p kling-metrics --release --lib -- --ignored --nocapture redaction_time`.
    #[test]
    #[ignore = "a measurement, not a test"]
    #[allow(clippy::print_stderr)]
    fn redaction_time_on_128_kib() {
        for unit in ["eyJ", "://"] {
            let text = unit.repeat(128 * 1024 / unit.len());
            let start = std::time::Instant::now();
            let shown = redact(&text);
            let spent = start.elapsed();
            eprintln!("{unit:?} x {} bytes: {spent:?}", text.len());
            assert_eq!(shown, text);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_is_timed_by_the_clock() {
        let failing = service_fn(|_req: http::Request<Full<Bytes>>| async {
            sleep(Duration::from_secs(4)).await;
            Err::<Response<Full<Bytes>>, BoxError>("connection reset".into())
        });
        let stack = MetricsLayer::new().layer(ClassifyLayer::new().layer(failing));
        assert_eq!(duration(stack).await, 4.0);
    }
}
