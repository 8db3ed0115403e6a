//! What users would otherwise pick: tower's own `Retry` + `ConcurrencyLimit` + `RateLimit`, with a
//! simple 429 retry, behind a `Buffer` where clones must share the limits.

use std::pin::Pin;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Sleep;
use tower::buffer::Buffer;
use tower::limit::{ConcurrencyLimit, RateLimit};
use tower::retry::{Policy, Retry};
use tower::{BoxError, ServiceBuilder};
use tower_service::Service;

use crate::fixtures::{Req, Res};

/// Retries a 429 or a 5xx (and a transport error) after a fixed pause, up to a number of
/// attempts: the retry policy most tower users write first.
#[derive(Clone, Debug)]
pub struct SimpleRetry {
    left: u32,
    pause: Duration,
}

impl SimpleRetry {
    /// `attempts` tries in all, `pause` between them.
    pub fn new(attempts: u32, pause: Duration) -> Self {
        SimpleRetry {
            left: attempts.saturating_sub(1),
            pause,
        }
    }
}

impl<E> Policy<Req, Res, E> for SimpleRetry {
    type Future = Pin<Box<Sleep>>;

    fn retry(&mut self, _: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        let again = match result {
            Ok(response) => {
                response.status() == StatusCode::TOO_MANY_REQUESTS
                    || response.status().is_server_error()
            }
            Err(_) => true,
        };
        if !again || self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(Box::pin(tokio::time::sleep(self.pause)))
    }

    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        let mut copy = Req::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}

/// `rate_per_minute` as tower's `RateLimit` takes it: `num` requests per `per`.
fn rate(rate_per_minute: f64, burst: u64) -> (u64, Duration) {
    let per =
        Duration::from_secs_f64(60.0 * burst as f64 / rate_per_minute).max(Duration::from_nanos(1));
    (burst, per)
}

/// tower's stack without a `Buffer`: not shareable (tower's `RateLimit` is not `Clone`), and
/// `Retry` must then sit inside it (it needs a `Clone` inner service), so retries are not paced.
pub type TowerStack<S> = ConcurrencyLimit<RateLimit<Retry<SimpleRetry, S>>>;

/// `ConcurrencyLimit(RateLimit(Retry(inner)))`: the only order tower allows without a `Buffer`.
pub fn tower_stack<S>(
    inner: S,
    concurrency: usize,
    rate_per_minute: f64,
    burst: u64,
) -> TowerStack<S> {
    let (num, per) = rate(rate_per_minute, burst);
    ServiceBuilder::new()
        .concurrency_limit(concurrency)
        .rate_limit(num, per)
        .retry(SimpleRetry::new(3, Duration::from_secs(1)))
        .service(inner)
}

/// tower's stack made shareable: `Retry(Buffer(ConcurrencyLimit(RateLimit(inner))))`.
pub type TowerBuffered<S> =
    Retry<SimpleRetry, Buffer<Req, <ConcurrencyLimit<RateLimit<S>> as Service<Req>>::Future>>;

/// [`tower_stack`] behind a `Buffer` of `bound` requests, so clones share the limits.
pub fn tower_stack_buffered<S>(
    inner: S,
    concurrency: usize,
    rate_per_minute: f64,
    burst: u64,
    bound: usize,
) -> TowerBuffered<S>
where
    S: Service<Req, Response = Res> + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send + Sync,
{
    tower_stack_buffered_with(
        inner,
        concurrency,
        rate_per_minute,
        burst,
        bound,
        SimpleRetry::new(3, Duration::from_secs(1)),
    )
}

/// [`tower_stack_buffered`] with a given retry policy.
pub fn tower_stack_buffered_with<S>(
    inner: S,
    concurrency: usize,
    rate_per_minute: f64,
    burst: u64,
    bound: usize,
    retry: SimpleRetry,
) -> TowerBuffered<S>
where
    S: Service<Req, Response = Res> + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send + Sync,
{
    let (num, per) = rate(rate_per_minute, burst);
    let limited = ServiceBuilder::new()
        .concurrency_limit(concurrency)
        .rate_limit(num, per)
        .service(inner);
    Retry::new(retry, Buffer::new(limited, bound))
}
