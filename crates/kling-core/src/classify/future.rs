//! The [`Classify`](super::Classify) response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, RETRY_AFTER};
use http::response::Parts;
use http::{HeaderMap, HeaderValue, Response};
use http_body::Body;
use http_body_util::Full;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::call_clock;
use crate::error::{BodyTooLarge, BoxError, SendState, Transport};
use crate::outcome::Outcome;
use crate::retry_after::retry_after_delay;
use crate::signals::SendCounter;

pin_project! {
    /// Calls the client, reads the body up to the limit and attaches the outcome.
    ///
    /// Counts its request through the request's [`SendCounter`], if it carried one, once it
    /// reached Kling or may have: when the answer arrives, on an error unless the request
    /// surely never left, or when dropped after it was polled (see [`SendCounter`]).
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
        limit: usize,
    }

    impl<F, B> PinnedDrop for ResponseFuture<F, B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped in flight (a timeout, a caller that gave up): the request may have left.
            // Not while a panic unwinds: a warning hook that panicked too would abort.
            if let StateProj::Calling { sending, .. } = this.project().state.project()
                && let Some(sending) = sending.take()
                && sending.polled
                && !std::thread::panicking()
            {
                sending.counter.sent(sending.at);
            }
        }
    }
}

/// A request to count once it is known to have reached Kling, or that it may have.
struct Sending {
    counter: SendCounter,
    /// When it was sent (the step's `call`).
    at: Instant,
    /// Whether the client's future was polled: one never polled sent nothing.
    polled: bool,
}

impl Sending {
    /// The request of a future that was polled reached Kling, or may have: counted.
    #[inline]
    fn count(sending: &mut Option<Sending>) {
        if let Some(sending) = sending.take() {
            sending.counter.sent(sending.at);
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        // What to count rides with the client's future: the state is no larger for it (the
        // reading state is the larger), and every layer above moves this future.
        Calling { #[pin] future: F, sending: Option<Sending> },
        // `counted`: the request was counted as sent through its counter (see
        // `Outcome::counted_as_sent`).
        Reading {
            parts: Option<Parts>,
            #[pin] body: B,
            buffer: Buffer,
            has_retry_after: bool,
            counted: bool,
        },
        // Refused before sending (its account halted since its slots were granted): the
        // client was not called.
        Refused { error: Option<BoxError> },
        Done,
    }
}

/// Collected body data: one chunk is kept as is (the usual case), more are copied together.
#[derive(Default)]
enum Buffer {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Buffer {
    fn len(&self) -> usize {
        match self {
            Buffer::Empty => 0,
            Buffer::One(bytes) => bytes.len(),
            Buffer::Many(bytes) => bytes.len(),
        }
    }

    fn push(&mut self, mut data: impl Buf) {
        match self {
            Buffer::Empty => *self = Buffer::One(data.copy_to_bytes(data.remaining())),
            Buffer::One(first) => {
                let mut all = BytesMut::with_capacity(first.len() + data.remaining());
                all.extend_from_slice(first);
                while data.has_remaining() {
                    let chunk = data.chunk();
                    all.extend_from_slice(chunk);
                    let n = chunk.len();
                    data.advance(n);
                }
                *self = Buffer::Many(all);
            }
            Buffer::Many(all) => {
                while data.has_remaining() {
                    let chunk = data.chunk();
                    all.extend_from_slice(chunk);
                    let n = chunk.len();
                    data.advance(n);
                }
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Buffer::Empty => Bytes::new(),
            Buffer::One(bytes) => bytes,
            Buffer::Many(bytes) => bytes.freeze(),
        }
    }
}

/// Response maps with at most this many names are read in one pass for the two headers the
/// step reads; a larger one is looked up twice.
const ONE_PASS_HEADERS: usize = 16;

/// The first `Content-Length` value and whether a `Retry-After` is present, in one pass over a
/// small map: for the few headers a response has, comparing names (two standard names compare
/// as two bytes) costs less than hashing both names for two lookups.
fn read_headers(headers: &HeaderMap) -> (Option<&HeaderValue>, bool) {
    if headers.keys_len() > ONE_PASS_HEADERS {
        return (
            headers.get(CONTENT_LENGTH),
            headers.contains_key(RETRY_AFTER),
        );
    }
    let (mut length, mut retry_after) = (None, false);
    for (name, value) in headers {
        if *name == CONTENT_LENGTH {
            length = length.or(Some(value));
        } else if *name == RETRY_AFTER {
            retry_after = true;
        }
    }
    (length, retry_after)
}

/// The [`BodyTooLarge`] of a response whose body passed `limit`, with its `Retry-After` (read
/// as [`Outcome`] reads it, only when the header pass found one), so that a 429 or 503 page
/// too long to read still says when to come back.
fn too_large(parts: &Parts, has_retry_after: bool, limit: usize) -> BoxError {
    let retry_after = if has_retry_after {
        retry_after_delay(&parts.headers, SystemTime::now())
    } else {
        None
    };
    Box::new(BodyTooLarge::new(parts.status, limit).with_retry_after(retry_after, Instant::now()))
}

impl<F, B> ResponseFuture<F, B> {
    /// `counter`: the request's, taken out of it before it was sent at `call_clock::now()`.
    #[inline]
    pub(crate) fn new(future: F, limit: usize, counter: Option<SendCounter>) -> Self {
        ResponseFuture {
            state: State::Calling {
                future,
                sending: counter.map(|counter| Sending {
                    counter,
                    at: call_clock::now(),
                    polled: false,
                }),
            },
            limit,
        }
    }

    /// A request refused before it was sent, with `error` (the client was not called).
    #[cold]
    pub(crate) fn refused(error: BoxError, limit: usize) -> Self {
        ResponseFuture {
            state: State::Refused { error: Some(error) },
            limit,
        }
    }
}

impl<F, B> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Full<Bytes>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future, sending } => {
                    if let Some(sending) = sending {
                        sending.polled = true;
                    }
                    let response = match ready!(future.poll(cx)) {
                        Ok(response) => response,
                        Err(e) => {
                            let error = Transport::from_below(e);
                            if sending.is_some() && SendState::of(&*error) != SendState::NotSent {
                                Sending::count(sending);
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                    };
                    // Answered: it reached Kling, whatever its body turns out to be.
                    let counted = sending.is_some();
                    Sending::count(sending);
                    let (parts, body) = response.into_parts();
                    let (length, has_retry_after) = read_headers(&parts.headers);
                    let declared = length
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    if declared.is_some_and(|len| len > *this.limit as u64) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(too_large(&parts, has_retry_after, *this.limit)));
                    }
                    this.state.set(State::Reading {
                        parts: Some(parts),
                        body,
                        buffer: Buffer::Empty,
                        has_retry_after,
                        counted,
                    });
                }
                StateProj::Reading {
                    parts,
                    mut body,
                    buffer,
                    has_retry_after,
                    counted,
                } => {
                    loop {
                        match ready!(body.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => {
                                if let Ok(data) = frame.into_data() {
                                    if buffer.len() + data.remaining() > *this.limit {
                                        let error = match parts.as_ref() {
                                            Some(parts) => {
                                                too_large(parts, *has_retry_after, *this.limit)
                                            }
                                            None => Box::new(BodyTooLarge::new(
                                                http::StatusCode::default(),
                                                *this.limit,
                                            )),
                                        };
                                        this.state.set(State::Done);
                                        return Poll::Ready(Err(error));
                                    }
                                    buffer.push(data);
                                }
                            }
                            Some(Err(e)) => {
                                this.state.set(State::Done);
                                // The response had started: the request was sent.
                                return Poll::Ready(Err(Box::new(Transport::after_sent(e))));
                            }
                            None => break,
                        }
                    }
                    let parts = parts.take().expect("parts are taken once");
                    let bytes = std::mem::take(buffer).into_bytes();
                    let (has_retry_after, counted) = (*has_retry_after, *counted);
                    this.state.set(State::Done);
                    let outcome = match Outcome::parse_classified(
                        parts.status,
                        &parts.headers,
                        has_retry_after,
                        bytes.clone(),
                        Instant::now(),
                        counted,
                    ) {
                        Ok(outcome) => outcome,
                        Err(malformed) => return Poll::Ready(Err(Box::new(malformed))),
                    };
                    let mut response = Response::from_parts(parts, Full::new(bytes));
                    response.extensions_mut().insert(outcome);
                    return Poll::Ready(Ok(response));
                }
                StateProj::Refused { error } => {
                    let error = error
                        .take()
                        .expect("ResponseFuture polled after completion");
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderName;
    use tower::{Layer, Service, ServiceExt, service_fn};

    use super::*;
    use crate::ClassifyLayer;
    use crate::error::BodyTooLarge;

    /// Classifies a 429 carrying `headers` (plus `extra` other names) through the layer.
    async fn classify(
        headers: &[(HeaderName, &'static str)],
        extra: usize,
    ) -> Result<Response<Full<Bytes>>, BoxError> {
        let mut map = HeaderMap::new();
        for k in 0..extra {
            let name = HeaderName::try_from(format!("x-extra-{k}")).unwrap();
            map.insert(name, HeaderValue::from_static("v"));
        }
        for (name, value) in headers {
            map.append(name, HeaderValue::from_static(value));
        }
        let client = service_fn(move |_req: http::Request<Full<Bytes>>| {
            let mut response = Response::new(Full::new(Bytes::from_static(
                br#"{"code":1302,"message":"too fast","request_id":"r"}"#,
            )));
            *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
            *response.headers_mut() = map.clone();
            async move { Ok::<_, BoxError>(response) }
        });
        ClassifyLayer::new()
            .max_body_bytes(100)
            .layer(client)
            .oneshot(http::Request::new(Full::new(Bytes::new())))
            .await
    }

    #[tokio::test]
    async fn the_step_reads_retry_after_and_content_length_in_maps_of_any_size() {
        for extra in [0, 3, ONE_PASS_HEADERS + 4] {
            let response = classify(&[(RETRY_AFTER, "7")], extra).await.unwrap();
            let outcome = crate::Outcome::of(&response).unwrap();
            assert_eq!(
                outcome.retry_after(),
                Some(Duration::from_secs(7)),
                "{extra}"
            );

            let response = classify(&[], extra).await.unwrap();
            assert_eq!(crate::Outcome::of(&response).unwrap().retry_after(), None);

            // The first `Content-Length` is the one declared.
            let too_long = [(CONTENT_LENGTH, "101"), (CONTENT_LENGTH, "5")];
            let err = classify(&too_long, extra).await.unwrap_err();
            assert!(err.is::<BodyTooLarge>(), "{extra}: {err}");
            let fits = [(CONTENT_LENGTH, "5"), (CONTENT_LENGTH, "101")];
            assert!(classify(&fits, extra).await.is_ok(), "{extra}");
        }
    }

    /// A 429 page over the limit, declared by its `Content-Length` or found while reading,
    /// keeps its `Retry-After` (the longest of several) and when it was given up.
    #[tokio::test(start_paused = true)]
    async fn a_body_too_large_keeps_the_retry_after_of_its_headers() {
        let page = |headers: Vec<(HeaderName, &'static str)>| {
            let client = service_fn(move |_req: http::Request<Full<Bytes>>| {
                let mut response = Response::new(Full::new(Bytes::from(vec![b'x'; 200])));
                *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
                for (name, value) in &headers {
                    response
                        .headers_mut()
                        .append(name, HeaderValue::from_static(value));
                }
                async move { Ok::<_, BoxError>(response) }
            });
            ClassifyLayer::new()
                .max_body_bytes(100)
                .layer(client)
                .oneshot(http::Request::new(Full::new(Bytes::new())))
        };
        for declared in [None, Some("200")] {
            let length = declared.map(|len| (CONTENT_LENGTH, len));
            let start = Instant::now();
            tokio::time::advance(Duration::from_secs(1)).await;
            let headers = [
                (RETRY_AFTER, "7"),
                (RETRY_AFTER, "9"),
                (RETRY_AFTER, "soon"),
            ];
            let err = page(headers.into_iter().chain(length.clone()).collect())
                .await
                .unwrap_err();
            let large = err.downcast_ref::<BodyTooLarge>().expect("too large");
            assert_eq!(large.status(), http::StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(
                large.retry_after(),
                Some(Duration::from_secs(9)),
                "{declared:?}"
            );
            let at = start + Duration::from_secs(1);
            assert_eq!(large.received_at(), Some(at), "{declared:?}");
            assert_eq!(large.resume_at(), Some(at + Duration::from_secs(9)));

            let err = page(length.into_iter().collect()).await.unwrap_err();
            let large = err.downcast_ref::<BodyTooLarge>().expect("too large");
            assert_eq!(large.retry_after(), None, "{declared:?}");
            assert_eq!(large.resume_at(), None, "{declared:?}");
        }
    }

    /// Records each request counted, and whether a classify step took the counter.
    #[derive(Default)]
    struct Tally {
        attached: std::sync::atomic::AtomicU32,
        sent: std::sync::Mutex<Vec<Instant>>,
    }

    impl crate::signals::CountSent for Tally {
        fn attached(&self) {
            self.attached
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }

        fn sent(&self, at: Instant) {
            self.sent.lock().unwrap().push(at);
        }
    }

    /// A request carrying a counter reporting to a fresh tally.
    fn counted() -> (std::sync::Arc<Tally>, http::Request<Full<Bytes>>) {
        let tally = std::sync::Arc::new(Tally::default());
        let mut request = http::Request::new(Full::new(Bytes::new()));
        SendCounter::set(&mut request, SendCounter::new(tally.clone()));
        (tally, request)
    }

    /// The client: answers after `answer` seconds, or fails at once with an I/O error of
    /// `kind`.
    fn client(
        answer: u64,
        kind: Option<std::io::ErrorKind>,
    ) -> impl tower::Service<
        http::Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Future<Output = Result<Response<Full<Bytes>>, BoxError>>,
    > + Clone {
        service_fn(move |_req: http::Request<Full<Bytes>>| async move {
            if let Some(kind) = kind {
                return Err(Box::new(Transport::new(std::io::Error::from(kind))) as BoxError);
            }
            tokio::time::sleep(Duration::from_secs(answer)).await;
            Ok(Response::new(Full::new(Bytes::from_static(
                br#"{"code":0,"message":"SUCCEED","request_id":"r","data":null}"#,
            ))))
        })
    }

    /// The step counts each request once, at the instant it was sent, once it knows the
    /// request reached Kling or may have: answered (also as a body too large or no envelope),
    /// failed after it may have left, dropped in flight. Not a request that surely never left,
    /// nor one whose future was never polled; a second classify step below counts nothing.
    #[tokio::test(start_paused = true)]
    async fn the_step_counts_each_request_once_at_the_instant_it_was_sent() {
        let sent = Instant::now();
        // Answered three seconds later: counted at the send.
        let (tally, request) = counted();
        let twice = ClassifyLayer::new().layer(ClassifyLayer::new().layer(client(3, None)));
        twice.oneshot(request).await.unwrap();
        assert_eq!(*tally.sent.lock().unwrap(), [sent]);
        assert_eq!(tally.attached.load(std::sync::atomic::Ordering::SeqCst), 1);

        // An answer that is no envelope reached Kling all the same.
        let (tally, request) = counted();
        let page = service_fn(|_req: http::Request<Full<Bytes>>| async {
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"<html>"))))
        });
        ClassifyLayer::new()
            .layer(page)
            .oneshot(request)
            .await
            .unwrap_err();
        assert_eq!(tally.sent.lock().unwrap().len(), 1, "no envelope");

        // Refused before it left, reset after it did.
        for (kind, count) in [
            (std::io::ErrorKind::ConnectionRefused, 0),
            (std::io::ErrorKind::ConnectionReset, 1),
        ] {
            let (tally, request) = counted();
            let failing = ClassifyLayer::new().layer(client(0, Some(kind)));
            failing.oneshot(request).await.unwrap_err();
            assert_eq!(tally.sent.lock().unwrap().len(), count, "{kind:?}");
        }

        // Dropped in flight, five seconds after it was sent: counted at the send.
        let (tally, request) = counted();
        let sent = Instant::now();
        let slow = ClassifyLayer::new().layer(client(60, None));
        let dropped = tokio::time::timeout(Duration::from_secs(5), slow.clone().oneshot(request));
        assert!(dropped.await.is_err(), "timed out");
        assert_eq!(*tally.sent.lock().unwrap(), [sent]);

        // Never polled: never sent.
        let (tally, request) = counted();
        let mut service = slow;
        drop(service.call(request));
        assert_eq!(tally.attached.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(tally.sent.lock().unwrap().is_empty(), "never polled");
    }

    /// The outcome the step attaches says whether it counted the request as sent: so it did
    /// for one that carried a counter, not for one without, and an outcome parsed elsewhere
    /// (a layer above that read an answer that passed no classify step) never says so.
    #[tokio::test(start_paused = true)]
    async fn the_outcome_says_whether_the_step_counted_its_request() {
        let (tally, request) = counted();
        let step = ClassifyLayer::new().layer(client(0, None));
        let response = step.clone().oneshot(request).await.unwrap();
        assert_eq!(tally.sent.lock().unwrap().len(), 1);
        assert!(crate::Outcome::of(&response).unwrap().counted_as_sent());

        let bare = http::Request::new(Full::new(Bytes::new()));
        let mut response = step.oneshot(bare).await.unwrap();
        assert!(!crate::Outcome::of(&response).unwrap().counted_as_sent());

        response.extensions_mut().clear();
        let parsed = crate::Outcome::ensure(&mut response).unwrap();
        assert!(!parsed.counted_as_sent(), "parsed above the step");
    }

    /// Halts the accounts named, as a task-slots layer would.
    #[derive(Default)]
    struct Halting(std::sync::Mutex<Vec<&'static str>>);

    #[derive(Debug)]
    struct Refused;

    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("halted")
        }
    }

    impl std::error::Error for Refused {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&crate::error::RefusedBeforeSending)
        }
    }

    impl crate::signals::HaltedAccounts for std::sync::Arc<Halting> {
        fn refusal(&self, account: &crate::AccountId) -> Option<BoxError> {
            let halted = self.0.lock().unwrap().contains(&account.as_str());
            halted.then(|| Box::new(Refused) as BoxError)
        }
    }

    /// A create whose account was halted since its gate was stamped, and is halted still, is
    /// refused without calling the client (and not counted); one of another account, one
    /// stamped after the halt, and one whose account's halt was lifted are sent.
    #[tokio::test(start_paused = true)]
    async fn the_step_refuses_a_create_whose_account_was_halted_since_its_grant() {
        use crate::signals::{CreateHalts, HaltGate};
        let halting = std::sync::Arc::new(Halting::default());
        let halts =
            crate::lanes::Lanes::new(std::sync::Arc::new(CreateHalts::new(halting.clone())));
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = calls.clone();
        let client = service_fn(move |_req: http::Request<Full<Bytes>>| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
                    br#"{"code":0,"message":"SUCCEED","request_id":"r","data":null}"#,
                ))))
            }
        });
        let step = ClassifyLayer::new().layer(client);
        let gated = |account: &str| {
            let (tally, mut request) = counted();
            let gate = HaltGate::new(halts.lane(), crate::AccountId::new(account));
            HaltGate::set_with_watch(&mut request, Some(gate));
            (tally, request)
        };
        let (a_tally, a) = gated("a");
        let (_, b) = gated("b");
        let (_, lifted) = gated("a");
        halting.0.lock().unwrap().push("a");
        halts.get().halted();
        let (_, after) = gated("a");

        let err = step.clone().oneshot(a).await.unwrap_err();
        assert!(err.is::<Refused>(), "the layer's refusal, as it is");
        assert_eq!(crate::SendState::of(&*err), crate::SendState::NotSent);
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "not sent"
        );
        assert!(a_tally.sent.lock().unwrap().is_empty(), "not counted");
        step.clone().oneshot(b).await.unwrap();
        // Stamped after the halt: the account was halted at its grant (the slots refuse it
        // there), so the gate lets it through.
        step.clone().oneshot(after).await.unwrap();
        halting.0.lock().unwrap().clear();
        step.clone().oneshot(lifted).await.unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn one_pass_over_the_headers_reads_what_two_lookups_read() {
        let names = [
            CONTENT_LENGTH,
            RETRY_AFTER,
            http::header::CONTENT_TYPE,
            http::header::DATE,
            HeaderName::from_static("x-request-id"),
        ];
        // Maps of every size around the one-pass limit, each name present or not, repeated
        // values included.
        for extra in [
            0,
            3,
            ONE_PASS_HEADERS - 2,
            ONE_PASS_HEADERS,
            ONE_PASS_HEADERS + 5,
        ] {
            for present in 0..(1 << names.len()) {
                let mut headers = HeaderMap::new();
                for k in 0..extra {
                    let name = HeaderName::try_from(format!("x-extra-{k}")).unwrap();
                    headers.insert(name, HeaderValue::from_static("v"));
                }
                for (bit, name) in names.iter().enumerate() {
                    if present & (1 << bit) != 0 {
                        headers.append(name, HeaderValue::from(bit));
                        headers.append(name, HeaderValue::from(bit + 10));
                    }
                }
                assert_eq!(
                    read_headers(&headers),
                    (
                        headers.get(CONTENT_LENGTH),
                        headers.contains_key(RETRY_AFTER)
                    ),
                    "{headers:?}"
                );
            }
        }
    }
}
