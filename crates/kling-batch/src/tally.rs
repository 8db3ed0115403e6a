//! [`TallyLayer`]: counts the requests that pass it and their answers by Kling code, for the
//! progress display and the summary.
//!
//! The run puts one above the retry layer (logical calls) and one right above the classify
//! step (attempts actually sent): the difference is the retries.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use kling_core::Outcome;
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

/// What a [`TallyLayer`] counted.
#[derive(Debug, Default)]
pub struct Counts {
    requests: AtomicU64,
    errors: AtomicU64,
    known: [AtomicU64; KNOWN.len()],
    other: Mutex<Others>,
}

impl Counts {
    /// Requests that passed.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests that ended in an error instead of a response.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
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
                    let code = outcome.code().as_i64();
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
            }
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
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

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        ResponseFuture {
            inner: self.inner.call(request),
            counts: self.counts.clone(),
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
        Poll::Ready(result)
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
