//! Counters of requests and their answers by Kling code, for the progress display and the
//! summary.
//!
//! The run puts a [`TallyLayer`] above the whole stack (logical calls) and an
//! [`AttemptTallyLayer`] under it, on the client (attempts actually sent). Each call carries a
//! [`CallAttempts`] in its request's extensions (the layers between copy them to every
//! attempt), so the attempt tally counts the attempts past a call's first as its
//! [`retries`](Counts::retries), and the call tally the calls that sent nothing
//! ([`unsent`](Counts::unsent): refused by the stack's own limiters, or dropped at a stop).
//! A request that carries none is a layer's own, made for a call (the retry layer's lookup
//! by external id): [`extra`](Counts::extra). `attempts - calls` was no count of retries:
//! each call refused before sending hid one.
//!
//! The attempts are counted under the stack's own classify step, not over a second one: a
//! classify step turns every error from below into a transport failure "after sending", so one
//! under the stack's made a proxy's `404` page look like a create of unknown outcome (looked
//! up instead of refused), a `429` page lose its `Retry-After`, and a too-large body look
//! worth retrying. [`AttemptTally`] passes the client's errors through untouched and reads
//! each answer's code from the body as the classify step reads it, frame by frame.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use kling_core::{Envelope, Outcome};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// The codes counted without a lock: success, and every code of Kling's table.
const KNOWN: [i64; 24] = [
    0, 1000, 1001, 1002, 1003, 1004, 1100, 1101, 1102, 1103, 1200, 1201, 1202, 1203, 1300, 1301,
    1302, 1303, 1304, 5000, 5001, 5002, 404, 500,
];

fn slot(code: i64) -> Option<usize> {
    KNOWN.iter().position(|c| *c == code)
}

/// Codes outside [`KNOWN`] counted by number; the answers of later ones are summed
/// ([`Counts::other_codes`]). The code is the server's input: one answering a new code each
/// time must not grow the counts without end. The bound of kling-metrics' snapshot.
const OTHER_CODES: usize = 32;

/// The answers of codes outside [`KNOWN`].
#[derive(Debug, Default)]
struct Others {
    by_code: BTreeMap<i64, u64>,
    /// Answers of codes past the first [`OTHER_CODES`].
    rest: u64,
}

/// What a [`TallyLayer`] or an [`AttemptTallyLayer`] counted.
#[derive(Debug, Default)]
pub struct Counts {
    requests: AtomicU64,
    errors: AtomicU64,
    known: [AtomicU64; KNOWN.len()],
    other: Mutex<Others>,
    /// Answers without a Kling envelope, by HTTP status (at most 900 statuses exist).
    pages: Mutex<BTreeMap<u16, u64>>,
    /// Answers sent with HTTP 429, by Kling code: at most [`REJECTED_CODES`] codes.
    rejected: Mutex<Rejected>,
    /// Attempts that were not their call's first (an [`AttemptTallyLayer`]'s).
    retries: AtomicU64,
    /// Requests that carried no [`CallAttempts`] (an [`AttemptTallyLayer`]'s).
    extra: AtomicU64,
    /// Calls that ended without sending an attempt (a [`TallyLayer`]'s).
    unsent: AtomicU64,
}

/// The answers sent with HTTP 429.
#[derive(Debug, Default)]
struct Rejected {
    by_code: BTreeMap<i64, u64>,
    /// Answers of codes past the first [`REJECTED_CODES`], so that the totals add up.
    rest: u64,
}

/// How many attempts one logical call has sent so far: put in the request's extensions by
/// [`Tally`] (or by the caller, to read it afterwards), counted by [`AttemptTally`]. The
/// layers between copy a request's extensions to each attempt they send (retries, re-signs).
///
/// Zero once the call ended (or was dropped) means nothing of it left this process: every
/// attempt passes the attempt tally on its way to the client.
///
/// A second extension beside the stack's own signals, it makes the retry layer's template and
/// the auth layer's resend copy the whole extension map (4 allocations each) instead of the
/// signals alone (none). Kept so: counting by the task that polls the call instead would make
/// "nothing left" (a stopped create sent again without a lookup) rest on no layer ever
/// sending from another task. A slot for it among kling-core's signals would cost a refcount.
///
/// # Clone
///
/// Clones share the count.
#[derive(Clone, Debug, Default)]
pub struct CallAttempts(Arc<AtomicU32>);

impl CallAttempts {
    /// A call that has sent nothing yet.
    pub fn new() -> Self {
        CallAttempts::default()
    }

    /// The attempts handed to the client so far.
    pub fn sent(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }

    /// Counts one attempt; the attempts before it.
    fn attempt(&self) -> u32 {
        self.0.fetch_add(1, Ordering::SeqCst)
    }
}

/// The most codes [`Counts::rejections_429`] keeps: Kling's table and [`OTHER_CODES`] more
/// (the code is the server's input).
const REJECTED_CODES: usize = KNOWN.len() + OTHER_CODES;

impl Counts {
    /// Requests that passed.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests that ended in an error instead of a response: for attempts, those that got
    /// no answer (a transport failure) or whose answer was not read to its end (broken off,
    /// larger than the stack reads, or timed out).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Answers that were no Kling envelope (a proxy's, a gateway's or a WAF's own page), by
    /// HTTP status. Only an [`AttemptTallyLayer`] counts these; the stack turns them into
    /// errors (`kling_core::error::MalformedResponse`).
    pub fn pages(&self) -> BTreeMap<u16, u64> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Responses by Kling code: every code of Kling's table, and the first 32 others seen
    /// (the rest are in [`other_codes`](Self::other_codes)).
    pub fn by_code(&self) -> BTreeMap<i64, u64> {
        let mut map = self.others().by_code.clone();
        for (code, count) in KNOWN.iter().zip(&self.known) {
            let n = count.load(Ordering::Relaxed);
            if n > 0 {
                map.insert(*code, n);
            }
        }
        map
    }

    /// Responses of one code (0 for a code past the first 32 outside Kling's table).
    pub fn of(&self, code: i64) -> u64 {
        match slot(code) {
            Some(i) => self.known[i].load(Ordering::Relaxed),
            None => self.others().by_code.get(&code).copied().unwrap_or(0),
        }
    }

    /// Answers sent with HTTP 429, by Kling code, whatever the code (an undocumented one
    /// too): what Kling's table says of a code is not what the server sent. The answers of
    /// codes past the first 56 (Kling's table and 32 more: the code is the server's input)
    /// are summed in [`other_rejections_429`](Self::other_rejections_429).
    pub fn rejections_429(&self) -> BTreeMap<i64, u64> {
        self.rejected().by_code.clone()
    }

    /// Answers sent with HTTP 429 whose code came after 56 others: with
    /// [`rejections_429`](Self::rejections_429), every answer sent with 429.
    pub fn other_rejections_429(&self) -> u64 {
        self.rejected().rest
    }

    fn rejected(&self) -> std::sync::MutexGuard<'_, Rejected> {
        self.rejected.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attempts sent beyond each call's first (retries and re-signs), as an
    /// [`AttemptTallyLayer`] counts them. A call refused before sending sent none and adds
    /// none.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Requests that carried no call's [`CallAttempts`], as an [`AttemptTallyLayer`] counts
    /// them. Under a [`TallyLayer`], which gives every call one, these are requests a layer
    /// made for a call without copying its extensions: the retry layer's lookup of a create by
    /// its external id. Sent beyond the call's first, as [`retries`](Self::retries) are.
    pub fn extra(&self) -> u64 {
        self.extra.load(Ordering::Relaxed)
    }

    /// Calls that ended (or were dropped) without sending an attempt, as a [`TallyLayer`]
    /// counts them: refused by the stack's own limiters (rate, slots, drain, budget) or given
    /// up at a stop while they waited.
    pub fn unsent(&self) -> u64 {
        self.unsent.load(Ordering::Relaxed)
    }

    /// Responses whose code is outside Kling's table and came after 32 other such codes.
    pub fn other_codes(&self) -> u64 {
        self.others().rest
    }

    fn others(&self) -> std::sync::MutexGuard<'_, Others> {
        self.other.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record<B>(&self, result: &Result<Response<B>, impl Sized>) {
        match result {
            Ok(response) => {
                if let Some(outcome) = Outcome::of(response) {
                    self.record_answer(outcome.code().as_i64(), response.status());
                }
            }
            Err(_) => self.record_error(),
        }
    }

    /// An answer of `code` sent with `status`.
    fn record_answer(&self, code: i64, status: StatusCode) {
        self.record_code(code);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let mut rejected = self.rejected();
            if let Some(count) = rejected.by_code.get_mut(&code) {
                *count += 1;
            } else if rejected.by_code.len() < REJECTED_CODES {
                rejected.by_code.insert(code, 1);
            } else {
                rejected.rest += 1;
            }
        }
    }

    fn record_code(&self, code: i64) {
        match slot(code) {
            Some(i) => {
                self.known[i].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                let mut others = self.others();
                if let Some(count) = others.by_code.get_mut(&code) {
                    *count += 1;
                } else if others.by_code.len() < OTHER_CODES {
                    others.by_code.insert(code, 1);
                } else {
                    others.rest += 1;
                }
            }
        }
    }

    fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn record_page(&self, status: StatusCode) {
        *self
            .pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(status.as_u16())
            .or_default() += 1;
    }
}

/// Counts requests and answers into shared [`Counts`].
///
/// # Clone
///
/// Clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct TallyLayer {
    counts: Arc<Counts>,
}

impl TallyLayer {
    /// A layer with fresh counts.
    pub fn new() -> Self {
        TallyLayer::default()
    }

    /// The counts, shared with every service this layer made.
    pub fn counts(&self) -> Arc<Counts> {
        self.counts.clone()
    }
}

impl<S> Layer<S> for TallyLayer {
    type Service = Tally<S>;

    fn layer(&self, inner: S) -> Tally<S> {
        Tally {
            inner,
            counts: self.counts.clone(),
        }
    }
}

/// The service of [`TallyLayer`].
#[derive(Clone, Debug)]
pub struct Tally<S> {
    inner: S,
    counts: Arc<Counts>,
}

impl<S, B, ResB> Service<Request<B>> for Tally<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        let attempts = match request.extensions().get::<CallAttempts>() {
            Some(attempts) => attempts.clone(),
            None => {
                let attempts = CallAttempts::new();
                request.extensions_mut().insert(attempts.clone());
                attempts
            }
        };
        ResponseFuture {
            inner: self.inner.call(request),
            counts: self.counts.clone(),
            attempts: Some(attempts),
        }
    }
}

pin_project! {
    /// The response future of [`Tally`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        counts: Arc<Counts>,
        // The call's attempts, until it is counted as sent or not.
        attempts: Option<CallAttempts>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            count_unsent(this.counts, this.attempts.take());
        }
    }
}

/// Counts a call that ended without sending anything.
fn count_unsent(counts: &Counts, attempts: Option<CallAttempts>) {
    if attempts.is_some_and(|a| a.sent() == 0) {
        counts.unsent.fetch_add(1, Ordering::Relaxed);
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<ResB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        this.counts.record(&result);
        count_unsent(this.counts, this.attempts.take());
        Poll::Ready(result)
    }
}

/// Counts every attempt the stack sends, from under its classify step: the request, and the
/// answer's Kling code (or HTTP status, for a page without an envelope) once the classify
/// step has read the body to its end.
///
/// Put it on the client, under [`KlingLayer`](kling_tower::KlingLayer): it changes neither
/// the requests nor the errors, and hands the body up frame by frame, keeping (shared, not
/// copied) what it needs to read the code, never more than `max_body_bytes`.
///
/// # Clone
///
/// Clones share the counts.
#[derive(Clone, Debug)]
pub struct AttemptTallyLayer {
    counts: Arc<Counts>,
    limit: usize,
}

impl AttemptTallyLayer {
    /// A layer with fresh counts that reads answers of up to `max_body_bytes` (the stack's
    /// [`body_limit`](kling_tower::StackConfig::body_limit): the classify step refuses larger
    /// ones, and they count as [`errors`](Counts::errors)).
    pub fn new(max_body_bytes: usize) -> Self {
        AttemptTallyLayer {
            counts: Arc::default(),
            limit: max_body_bytes,
        }
    }

    /// The counts, shared with every service this layer made.
    pub fn counts(&self) -> Arc<Counts> {
        self.counts.clone()
    }
}

impl<S> Layer<S> for AttemptTallyLayer {
    type Service = AttemptTally<S>;

    fn layer(&self, inner: S) -> AttemptTally<S> {
        AttemptTally {
            inner,
            counts: self.counts.clone(),
            limit: self.limit,
        }
    }
}

/// The service of [`AttemptTallyLayer`].
#[derive(Clone, Debug)]
pub struct AttemptTally<S> {
    inner: S,
    counts: Arc<Counts>,
    limit: usize,
}

impl<S, B, ResB> Service<Request<B>> for AttemptTally<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
{
    type Response = Response<AttemptBody<ResB>>;
    type Error = S::Error;
    type Future = AttemptFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        // Counted before the client has the request: a call whose count is 0 sent nothing.
        match request.extensions().get::<CallAttempts>() {
            Some(attempts) => {
                if attempts.attempt() > 0 {
                    self.counts.retries.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                self.counts.extra.fetch_add(1, Ordering::Relaxed);
            }
        }
        AttemptFuture {
            inner: self.inner.call(request),
            counts: Some(self.counts.clone()),
            limit: self.limit,
        }
    }
}

pin_project! {
    /// The response future of [`AttemptTally`].
    #[derive(Debug)]
    pub struct AttemptFuture<F> {
        #[pin]
        inner: F,
        counts: Option<Arc<Counts>>,
        limit: usize,
    }
}

impl<F, ResB, E> Future for AttemptFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    ResB: Body<Data = Bytes>,
{
    type Output = Result<Response<AttemptBody<ResB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let counts = this.counts.take().expect("polled after completion");
        Poll::Ready(match result {
            Ok(response) => {
                let status = response.status();
                let limit = *this.limit;
                Ok(response.map(|body| AttemptBody {
                    inner: body,
                    reading: Some(Reading {
                        counts,
                        status,
                        limit,
                        body: Kept::Empty,
                    }),
                }))
            }
            Err(e) => {
                counts.record_error();
                Err(e)
            }
        })
    }
}

pin_project! {
    /// The body of an answer [`AttemptTally`] counts: the client's, frame by frame. The answer
    /// is counted when the body ends, as an error when it breaks off or is dropped before.
    pub struct AttemptBody<B> {
        #[pin]
        inner: B,
        reading: Option<Reading>,
    }

    impl<B> PinnedDrop for AttemptBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(reading) = this.project().reading.take() {
                reading.counts.record_error();
            }
        }
    }
}

impl<B> std::fmt::Debug for AttemptBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptBody").finish_non_exhaustive()
    }
}

/// An answer being read: where it is counted, and its body so far.
struct Reading {
    counts: Arc<Counts>,
    status: StatusCode,
    limit: usize,
    body: Kept,
}

/// The body data seen so far: one chunk is kept as is (the usual case), more are copied
/// together; past the limit, nothing.
enum Kept {
    Empty,
    One(Bytes),
    Many(BytesMut),
    TooLarge,
}

impl Reading {
    fn push(&mut self, data: &Bytes) {
        let len = match &self.body {
            Kept::Empty => 0,
            Kept::One(one) => one.len(),
            Kept::Many(many) => many.len(),
            Kept::TooLarge => return,
        };
        if len + data.len() > self.limit {
            self.body = Kept::TooLarge;
            return;
        }
        self.body = match std::mem::replace(&mut self.body, Kept::Empty) {
            Kept::Empty => Kept::One(data.clone()),
            Kept::One(one) => {
                let mut many = BytesMut::with_capacity(one.len() + data.len());
                many.extend_from_slice(&one);
                many.extend_from_slice(data);
                Kept::Many(many)
            }
            Kept::Many(mut many) => {
                many.extend_from_slice(data);
                Kept::Many(many)
            }
            Kept::TooLarge => Kept::TooLarge,
        };
    }

    /// The body ended: its code, or the page's status when it is no Kling envelope (the
    /// classify step's own judgement: [`Envelope::parse`]).
    fn finish(self) {
        let parsed = match &self.body {
            Kept::Empty => Envelope::parse(b""),
            Kept::One(one) => Envelope::parse(one),
            Kept::Many(many) => Envelope::parse(many),
            Kept::TooLarge => return self.counts.record_error(),
        };
        match parsed {
            Ok(envelope) => self
                .counts
                .record_answer(envelope.code.as_i64(), self.status),
            Err(_) => self.counts.record_page(self.status),
        }
    }
}

impl<B> Body for AttemptBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let (Some(data), Some(reading)) = (frame.data_ref(), this.reading.as_mut()) {
                    reading.push(data);
                }
            }
            Some(Err(_)) => {
                if let Some(reading) = this.reading.take() {
                    reading.counts.record_error();
                }
            }
            None => {
                if let Some(reading) = this.reading.take() {
                    reading.finish();
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use kling_core::ClassifyLayer;
    use tower::ServiceExt as _;

    #[tokio::test]
    async fn answers_are_counted_by_code_and_errors_apart() {
        let kling = tower::service_fn(|req: Request<Full<Bytes>>| async move {
            if req.uri().path() == "/down" {
                return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
            }
            let (status, body) = if req.uri().path() == "/busy" {
                (429, r#"{"code":1303,"message":"busy","request_id":"r"}"#)
            } else if req.uri().path() == "/odd" {
                (418, r#"{"code":9999,"message":"odd","request_id":"r"}"#)
            } else {
                (200, r#"{"code":0,"message":"SUCCEED","request_id":"r"}"#)
            };
            Ok(Response::builder()
                .status(status)
                .body(Full::new(Bytes::from(body)))
                .unwrap())
        });
        let tally = TallyLayer::new();
        let service = tally.layer(ClassifyLayer::new().layer(kling));
        for path in ["/ok", "/busy", "/busy", "/down", "/odd"] {
            let request = Request::get(path).body(Full::new(Bytes::new())).unwrap();
            let _ = service.clone().oneshot(request).await;
        }
        let counts = tally.counts();
        assert_eq!(counts.requests(), 5);
        assert_eq!(counts.errors(), 1);
        assert_eq!((counts.of(0), counts.of(1303), counts.of(1302)), (1, 2, 0));
        assert_eq!(counts.of(9999), 1);
        let by_code: Vec<(i64, u64)> = counts.by_code().into_iter().collect();
        assert_eq!(by_code, [(0, 1), (1303, 2), (9999, 1)]);
    }

    /// A body sent in several frames.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|data| Ok(Frame::data(data))))
        }
    }

    fn frames(parts: &[&'static str]) -> Frames {
        Frames(
            parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
        )
    }

    /// Under the stack's classify step, the attempt tally counts each answer by code (a page by
    /// status), and the step still sees each error as what it is: a refused connection as
    /// never sent, a page as a malformed response, a large body as too large.
    #[tokio::test]
    async fn attempts_are_counted_under_the_classify_step_without_changing_its_errors() {
        use kling_core::SendState;
        use kling_core::error::{BodyTooLarge, MalformedResponse};

        let client = tower::service_fn(|req: Request<Full<Bytes>>| async move {
            let (status, body) = match req.uri().path() {
                "/down" => {
                    return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
                }
                "/busy" => (
                    429,
                    frames(&[r#"{"code":1303,"message":"busy","request_id":"r"}"#]),
                ),
                "/split" => (
                    200,
                    frames(&[
                        r#"{"code":0,"mess"#,
                        r#"age":"SUCCEED","#,
                        r#""request_id":"r"}"#,
                    ]),
                ),
                "/page" => (404, frames(&["<html>404 Not Found</html>"])),
                "/empty" => (502, frames(&[])),
                _ => (200, Frames([Bytes::from(vec![b'x'; 101])].into())),
            };
            Ok(Response::builder().status(status).body(body).unwrap())
        });
        let attempts = AttemptTallyLayer::new(100);
        let service = ClassifyLayer::new()
            .max_body_bytes(100)
            .layer(attempts.layer(client));
        let mut errors = Vec::new();
        for path in ["/busy", "/split", "/down", "/page", "/empty", "/large"] {
            let request = Request::get(path).body(Full::new(Bytes::new())).unwrap();
            if let Err(e) = service.clone().oneshot(request).await {
                errors.push((path, e));
            }
        }
        let kinds: Vec<(&str, bool)> = errors
            .iter()
            .map(|(path, e)| {
                let right = match *path {
                    "/down" => SendState::of(&**e) == SendState::NotSent,
                    "/page" | "/empty" => e.is::<MalformedResponse>(),
                    "/large" => e.is::<BodyTooLarge>(),
                    _ => false,
                };
                (*path, right)
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("/down", true),
                ("/page", true),
                ("/empty", true),
                ("/large", true)
            ]
        );
        let counts = attempts.counts();
        assert_eq!(counts.requests(), 6);
        assert_eq!((counts.of(1303), counts.of(0)), (1, 1));
        assert_eq!(counts.pages(), BTreeMap::from([(404, 1), (502, 1)]));
        assert_eq!(
            counts.errors(),
            2,
            "the refused connection and the large body"
        );
    }

    /// The 429s are the answers sent with HTTP 429, by code: an undocumented code under 429
    /// is one, a code of Kling's 429 table under another status is not; and a server that
    /// answers 429 with a new code each time keeps a bounded map.
    #[tokio::test]
    async fn answers_sent_with_429_are_counted_by_code_whatever_the_code() {
        let client = tower::service_fn(|req: Request<Full<Bytes>>| async move {
            let (status, code) = match req.uri().path() {
                "/busy" => (429, 1303),
                "/odd" => (429, 1104),
                "/fast-but-200" => (200, 1302),
                path => (429, 30_000 + path.len() as i64),
            };
            let body = format!(r#"{{"code":{code},"message":"m","request_id":"r"}}"#);
            Ok::<_, std::io::Error>(
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
        });
        let attempts = AttemptTallyLayer::new(1000);
        let service = ClassifyLayer::new().layer(attempts.layer(client));
        for path in ["/busy", "/odd", "/odd", "/fast-but-200"] {
            let request = Request::get(path).body(Full::new(Bytes::new())).unwrap();
            let _ = service.clone().oneshot(request).await;
        }
        let counts = attempts.counts();
        assert_eq!(
            counts.rejections_429(),
            BTreeMap::from([(1104, 2), (1303, 1)])
        );
        assert_eq!(counts.of(1302), 1, "counted by code, not as a 429");
        for len in 1..200 {
            let request = Request::get(format!("/{}", "x".repeat(len)))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let _ = service.clone().oneshot(request).await;
        }
        assert_eq!(counts.rejections_429().len(), REJECTED_CODES);
        assert_eq!(REJECTED_CODES, 56, "as `rejections_429`'s docs say");
    }

    /// The answers of 429 codes past the 56th are summed, not dropped: the 429s by code and
    /// the others add up to every answer sent with 429, in the counts and in the summary.
    #[tokio::test]
    async fn the_429s_of_codes_past_the_bound_are_summed_so_the_totals_add_up() {
        let client = tower::service_fn(|req: Request<Full<Bytes>>| async move {
            let code: i64 = req.uri().path()[1..].parse().unwrap();
            let body = format!(r#"{{"code":{code},"message":"m","request_id":"r"}}"#);
            Ok::<_, std::io::Error>(
                Response::builder()
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
        });
        let attempts = AttemptTallyLayer::new(1000);
        let service = ClassifyLayer::new().layer(attempts.layer(client));
        let mut sent = 0;
        for code in (40_000..40_100).chain([1303, 40_099, 40_000]) {
            let request = Request::get(format!("/{code}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let _ = service.clone().oneshot(request).await;
            sent += 1;
        }
        let counts = attempts.counts();
        let by_code = counts.rejections_429();
        assert_eq!(by_code.len(), REJECTED_CODES);
        assert_eq!(
            by_code.values().sum::<u64>() + counts.other_rejections_429(),
            sent
        );
        // 40 056…40 099, then 1303 and 40 099 again (40 000 is kept by code).
        assert_eq!(counts.other_rejections_429(), 100 - 56 + 2);
        let mut summary = crate::summary::Summary::default();
        summary.set_rejections_429(&by_code, counts.other_rejections_429());
        assert_eq!(summary.rejections_429.values().sum::<u64>(), sent);
        assert_eq!(summary.rejections_429["other"], 46);
        assert!(summary.to_string().contains("other×46"), "{summary}");
    }

    /// A stand-in for the stack's layers: `/refused` is refused before anything is sent (a
    /// limiter's refusal), `/retried` is sent twice (a retry, the extensions copied as the
    /// retry layer copies them), anything else once.
    #[derive(Clone)]
    struct Layers<S>(S);

    impl<S> Service<Request<Full<Bytes>>> for Layers<S>
    where
        S: Service<Request<Full<Bytes>>, Error = std::io::Error> + Clone + Send + 'static,
        S::Response: Send,
        S::Future: Send,
    {
        type Response = S::Response;
        type Error = std::io::Error;
        type Future = Pin<Box<dyn Future<Output = Result<S::Response, std::io::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
            let inner = self.0.clone();
            Box::pin(async move {
                let sends = match request.uri().path() {
                    "/refused" => return Err(std::io::Error::other("refused before sending")),
                    "/retried" => 2,
                    _ => 1,
                };
                let mut answer = Err(std::io::Error::other("not sent"));
                for _ in 0..sends {
                    let mut copy = Request::new(request.body().clone());
                    *copy.uri_mut() = request.uri().clone();
                    *copy.extensions_mut() = request.extensions().clone();
                    answer = inner.clone().oneshot(copy).await;
                }
                answer
            })
        }
    }

    /// The retries are the attempts past each call's first, and a call refused before it was
    /// sent hides none of them: `attempts - calls` said 0 here (three calls, three attempts),
    /// though one call was sent twice.
    #[tokio::test]
    async fn retries_are_attempts_past_each_calls_first_and_unsent_calls_hide_none() {
        let client = tower::service_fn(|_: Request<Full<Bytes>>| async move {
            Ok::<_, std::io::Error>(Response::new(Full::new(Bytes::new())))
        });
        let attempts = AttemptTallyLayer::new(1000);
        let calls = TallyLayer::new();
        let service = calls.layer(Layers(attempts.layer(client)));
        for path in ["/once", "/retried", "/refused"] {
            let request = Request::get(path).body(Full::new(Bytes::new())).unwrap();
            let _ = service.clone().oneshot(request).await;
        }
        let (call_counts, attempt_counts) = (calls.counts(), attempts.counts());
        assert_eq!((call_counts.requests(), attempt_counts.requests()), (3, 3));
        assert_eq!(attempt_counts.retries(), 1, "the second send of `/retried`");
        assert_eq!(call_counts.unsent(), 1, "`/refused`");
        // A call given up before it is sent (dropped while it waits) sent nothing either.
        let mut waiting = calls.layer(tower::service_fn(|_: Request<Full<Bytes>>| {
            std::future::pending::<Result<Response<Full<Bytes>>, std::io::Error>>()
        }));
        let request = Request::get("/waits")
            .body(Full::new(Bytes::new()))
            .unwrap();
        drop(waiting.call(request));
        assert_eq!(call_counts.unsent(), 2);
        // The summary says what was counted.
        let mut summary = crate::summary::Summary::default();
        summary.set_traffic(3, 3, &BTreeMap::new(), 0);
        summary.set_retries(attempt_counts.retries(), call_counts.unsent());
        assert_eq!((summary.retries, summary.unsent_calls), (1, 2));
        assert!(summary.to_string().contains("calls not sent"), "{summary}");
    }

    /// An answer of `code`, as the classify step leaves it.
    fn answer(code: i64) -> Response<()> {
        let body = format!(r#"{{"code":{code},"message":"odd","request_id":"r"}}"#);
        let outcome = Outcome::parse(
            http::StatusCode::BAD_REQUEST,
            &http::HeaderMap::new(),
            body.as_bytes(),
            tokio::time::Instant::now(),
        )
        .unwrap();
        let mut response = Response::new(());
        response.extensions_mut().insert(outcome);
        response
    }

    /// A server answering a new code each time: 32 are kept by number, the rest summed.
    #[test]
    fn codes_outside_the_table_are_kept_up_to_the_bound_then_summed() {
        let counts = Counts::default();
        let record = |code| counts.record(&Ok::<_, ()>(answer(code)));
        for code in 0..100 {
            record(20_000 + code);
        }
        record(20_000);
        record(1302);
        assert_eq!(counts.by_code().len(), OTHER_CODES + 1);
        assert_eq!(counts.of(20_000), 2);
        assert_eq!(counts.of(1302), 1);
        assert_eq!(counts.of(20_099), 0);
        assert_eq!(counts.other_codes(), 100 - OTHER_CODES as u64);
    }
}
