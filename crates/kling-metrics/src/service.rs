//! [`Metrics`]: the service.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_core::call_clock;
use kling_core::error::BoxError;
use kling_core::lanes::Lanes;
use kling_core::signals::{Attempt, CountSent, SendCounter};
use kling_core::{PeekBody, RequestKind};
use tokio::time::Instant;
use tower_service::Service;
use tracing::field::Empty;

use crate::future::{Call, ResponseFuture};
use crate::recorder::{self, Target};
use crate::route::{self, PoolRef};
use crate::{Monitor, labels};

/// Measures each call and reports it through the `metrics` facade, a `tracing` span and its
/// [`Monitor`]. See [`MetricsLayer`](crate::MetricsLayer) and the crate docs.
///
/// Only passes through: it never changes a response, and of a request only its signals, where
/// it puts its [`SendCounter`] (a classify step below counts in the [`Monitor`]'s rate window
/// each request it sends, at the instant it was sent: every attempt of a retried call, an
/// auth layer's resend, a call dropped in flight) and, until its lane knows that a classify
/// step below counts them, a create's [`SendWatch`](kling_core::signals::SendWatch) (shared with
/// the layers below, so that a create dropped after it left counts in the rate window when no
/// classify step below counts it). Its error is the inner error as a [`BoxError`] (the stack's
/// error type), so it can read a Kling code out of an error that carries a
/// [`kling_core::error::ApiError`].
///
/// # Clone
///
/// Clones share the [`Monitor`].
pub struct Metrics<S> {
    inner: S,
    /// The monitor, one handle per lane: each call's future holds the monitor until it ends,
    /// through its thread's lane ([`kling_core::lanes`]), so the threads of a runtime do not
    /// write one shared count per call. Clones share the lanes.
    monitor: Arc<Lanes<Tap>>,
}

/// What a lane of a [`Metrics`] holds: the monitor, and whether a classify step below counts
/// the requests of this lane's calls as it sends them (its [`SendCounter`]).
///
/// A lane learns it from the first of its calls whose request reaches a classify step, before
/// that request is sent; from then on its calls that carry the counter leave the counting to
/// the step. A call that ends before its lane learned it sent nothing through a classify step,
/// and counts what it reports as before: the stack below has none (this layer over a bare
/// client), or the call never reached it; so does a call whose request carried no counter.
/// Each lane learns it on its own (a flag written once, then only read). A call answered past
/// any classify step (a stack below that sends some requests through a classify step and
/// others past it) counts what it reports all the same: its answer carries no outcome, or one
/// a layer between attached, which does not say a classify step counted the request
/// ([`kling_core::Outcome::counted_as_sent`]). A copy that a layer between sends without the
/// counter (see [`SendCounter`]) is counted only when its answer ends the call, by this layer,
/// as many as the answer reports (its `Attempt`, requests the step counted included). Still
/// uncounted, as the lane cannot tell one call's counter from another's: the requests of a
/// call that failed or was dropped after going past any classify step; and, with a classify
/// step above a retry layer, the attempts after the first (that step takes the counter before
/// the retry layer copies the request).
#[derive(Debug)]
pub(crate) struct Tap {
    monitor: Monitor,
    counted_below: AtomicBool,
}

impl Tap {
    /// Whether a classify step below counts this lane's requests.
    #[inline]
    pub(crate) fn counted_below(&self) -> bool {
        self.counted_below.load(Ordering::Relaxed)
    }
}

/// A new lane learns on its own.
impl Clone for Tap {
    fn clone(&self) -> Tap {
        Tap {
            monitor: self.monitor.clone(),
            counted_below: AtomicBool::new(false),
        }
    }
}

impl std::ops::Deref for Tap {
    type Target = Monitor;

    #[inline]
    fn deref(&self) -> &Monitor {
        &self.monitor
    }
}

impl CountSent for Tap {
    #[inline]
    fn attached(&self) {
        // Written once: then only read, so the lane's cache line stays shared.
        if !self.counted_below.load(Ordering::Relaxed) {
            self.counted_below.store(true, Ordering::Relaxed);
        }
    }

    fn sent(&self, at: Instant) {
        self.monitor.note_requests(at, 1);
    }
}

impl<S: Clone> Clone for Metrics<S> {
    fn clone(&self) -> Self {
        Metrics {
            inner: self.inner.clone(),
            monitor: Arc::clone(&self.monitor),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Metrics<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("inner", &self.inner)
            .field("monitor", &self.monitor.get().monitor)
            .finish()
    }
}

impl<S> Metrics<S> {
    /// Wraps `inner`, reporting to `monitor`.
    pub fn new(inner: S, monitor: Monitor) -> Self {
        Metrics {
            inner,
            monitor: Arc::new(Lanes::new(Tap {
                monitor,
                counted_below: AtomicBool::new(false),
            })),
        }
    }

    /// The monitor.
    pub fn monitor(&self) -> &Monitor {
        &self.monitor.get().monitor
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for Metrics<S>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>>,
    S::Error: Into<BoxError>,
    B: PeekBody,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let target = recorder::target();
        // This thread's lane, looked up once: the future holds it, and the monitor is read
        // through it.
        let lane = self.monitor.lane();
        let monitor: &Monitor = &lane;
        // The kind and pool from the path (or a cached recognition): no allocation, and the
        // layers below recognise the request when they need more. Only what tracks tasks when
        // nothing records the labels: whether it is a create (always a POST).
        let labelled = target != Target::Nothing
            || monitor.records_task_metrics()
            || tracing::level_enabled!(tracing::Level::INFO);
        let (kind, named, pool) = if labelled {
            let (kind, named) = route::of(&request);
            let pool = labels::pool(&named);
            (kind, named, pool)
        } else if request.method() == Method::POST {
            let kind = route::kind_of_post(&request);
            (kind, PoolRef::None, labels::NO_POOL)
        } else {
            (RequestKind::Other, PoolRef::None, labels::NO_POOL)
        };
        // Only what the request *is*: never its headers, URI query or body. The field values
        // are only computed when the span is enabled.
        let span = tracing::info_span!(
            target: "kling_metrics",
            "kling.request",
            kind = kind.as_str(),
            // The pool's own name, where its label may stand for many (`video:other`).
            pool = (named != PoolRef::None).then(|| display(&named)),
            attempt = Attempt::of(&request),
            status = Empty,
            code = Empty,
            request_id = Empty,
            task_id = Empty,
            wait_rate_limit_s = Empty,
            wait_slots_s = Empty,
        );
        // Where a classify step below counts each request it sends: a reference count on
        // this thread's lane, in the signals the request carries (the stack's requests all
        // do, and a create always gets them). Not put in another request without them: that
        // would cost it allocations, and the layer counts its requests when it ends, as before.
        // And whether a create dropped before its answer had left (see `Call::dropped`): the
        // layers below that hold it back unsent (the task slots, the rate limiter, the retry
        // layer's backoff) say so in a watch. Only read while the lane does not know that a
        // classify step below counts its requests (`Call::counted_below`; once it knows, it
        // always does), so only made then: afterwards it cost each create reference-count
        // writes for nothing, and an allocation where no layer below makes a watch (those that
        // read one make their own). Not made for other requests: it would cost each an
        // allocation.
        let (watch, counter) = if kind == RequestKind::Create {
            let counted_below = lane.counted_below();
            let counter = SendCounter::new(lane.clone());
            if counted_below {
                SendCounter::set(&mut request, counter);
                (None, true)
            } else {
                (
                    Some(SendCounter::set_with_watch(&mut request, counter)),
                    true,
                )
            }
        } else {
            let counted =
                SendCounter::set_in_signals(&mut request, || SendCounter::new(lane.clone()));
            (None, counted)
        };
        // The call's only clock read when a classify step timed the response (its arrival is
        // the call's end, see `ResponseFuture`); the layers called below share it.
        let (start, scope) = call_clock::enter();
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        drop(scope);
        let call = Call {
            start,
            kind,
            pool,
            monitor: lane,
            target,
            watch,
            counter,
            polled: false,
        };
        ResponseFuture::new(inner, span, call)
    }
}

#[cfg(test)]
mod tests {
    //! Each call's future holds the monitor until it ends, through its thread's lane.

    use bytes::Bytes;
    use http_body_util::Full;
    use tokio::time::Instant;
    use tower::{Service, ServiceExt, service_fn};

    use super::*;

    const CREATED: &str = r#"{"code":0,"message":"SUCCEED","request_id":"r","data":{"task_id":"ID","task_status":"submitted"}}"#;

    fn create() -> Request<Full<Bytes>> {
        Request::post("/v1/videos/text2video")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    /// A service answering each create with a new task id, in order.
    fn kling() -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
    > + Clone {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        service_fn(move |_req: Request<Full<Bytes>>| {
            let id = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move {
                let body = CREATED.replace("ID", &format!("task-{id}"));
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(body))))
            }
        })
    }

    #[tokio::test]
    async fn futures_keep_the_monitor_and_report_after_their_service_is_gone() {
        let monitor = Monitor::default();
        let mut service = Metrics::new(kling(), monitor.clone());
        let mut futures = Vec::new();
        for _ in 0..5 {
            futures.push(service.ready().await.unwrap().call(create()));
        }
        // The monitor and the service's lanes (futures count on a lane, not on the monitor).
        let lanes = 1 + kling_core::lanes::LANES;
        assert_eq!(monitor.holders(), lanes);
        let lane = service.monitor.lane();
        assert_eq!(
            Arc::strong_count(&lane),
            2 + 5,
            "the lanes, this one and five futures"
        );
        // Clones share the lanes.
        let mut clone = service.clone();
        futures.push(clone.ready().await.unwrap().call(create()));
        assert_eq!(monitor.holders(), lanes);
        drop(lane);
        drop((service, clone));
        for future in futures {
            future.await.unwrap();
        }
        assert_eq!(monitor.holders(), 1);
        let snapshot = monitor.snapshot();
        assert_eq!((snapshot.rate.requests, snapshot.tasks.created), (6, 6));
        assert_eq!(snapshot.tasks.running, 6);
    }

    /// Real time (not paused): the layers called inside share the metrics layer's reading,
    /// however long they work; the response future is outside it.
    #[tokio::test]
    async fn the_layers_below_share_the_calls_clock_reading() {
        let readings = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = readings.clone();
        let inner = service_fn(move |_req: Request<Full<Bytes>>| {
            let first = call_clock::now();
            std::thread::sleep(std::time::Duration::from_millis(2));
            log.lock().unwrap().push((first, call_clock::now()));
            let log = log.clone();
            async move {
                log.lock().unwrap().push((call_clock::now(), first));
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(CREATED))))
            }
        });
        let mut service = Metrics::new(inner, Monitor::default());
        let outside = Instant::now();
        service.ready().await.unwrap().call(create()).await.unwrap();
        let readings = readings.lock().unwrap().clone();
        let (first, second) = readings[0];
        assert_eq!(first, second, "one reading inside the call");
        assert!(first >= outside);
        let (polled, first) = readings[1];
        assert!(
            polled >= first + std::time::Duration::from_millis(2),
            "read afresh"
        );
    }
}
