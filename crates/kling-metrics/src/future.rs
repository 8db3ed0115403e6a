//! The [`Metrics`](crate::Metrics) response future.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use kling_core::error::{ApiError, BodyTooLarge, BoxError, MalformedResponse};
use kling_core::metrics::{
    LABEL_CODE, LABEL_KIND, LABEL_POOL, LABEL_STATUS, REQUEST_DURATION, RESPONSES,
};
use kling_core::signals::{Attempt, Waited};
use kling_core::{Outcome, Pool, RequestKind};
use metrics::SharedString;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tracing::Span;

use crate::Monitor;
use crate::labels;

pin_project! {
    /// Waits for the inner call inside the request's span, then records its metrics.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        call: Option<Call>,
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
struct Call {
    start: Instant,
    kind: RequestKind,
    pool: Option<Pool>,
    monitor: Monitor,
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(
        inner: F,
        span: Span,
        start: Instant,
        kind: RequestKind,
        pool: Option<Pool>,
        monitor: Monitor,
    ) -> Self {
        ResponseFuture {
            inner,
            span,
            call: Some(Call {
                start,
                kind,
                pool,
                monitor,
            }),
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
        let result = ready!(this.inner.poll(cx));
        let call = this
            .call
            .take()
            .expect("ResponseFuture polled after completion");
        Poll::Ready(match result {
            Ok(mut response) => {
                call.response(&mut response, this.span);
                Ok(response)
            }
            Err(error) => {
                let error = error.into();
                call.error(&*error, this.span);
                Err(error)
            }
        })
    }
}

impl Call {
    fn response(self, response: &mut Response<Full<Bytes>>, span: &Span) {
        let status = response.status();
        let code = match Outcome::ensure(response) {
            Ok(outcome) => {
                self.monitor.observe_tasks(
                    self.kind == RequestKind::Create,
                    self.pool.as_ref(),
                    &outcome,
                );
                if !span.is_disabled() {
                    span.record("request_id", outcome.request_id());
                    if let [task] = outcome.tasks() {
                        span.record("task_id", task.id.as_str());
                    }
                }
                if !outcome.is_success() {
                    tracing::warn!(
                        target: "kling_metrics",
                        code = outcome.code().as_i64(),
                        http_status = status.as_u16(),
                        message = outcome.message(),
                        request_id = outcome.request_id(),
                        "kling call failed"
                    );
                }
                if status == StatusCode::TOO_MANY_REQUESTS {
                    self.monitor.note_rejection(outcome.code().as_i64());
                }
                labels::code(outcome.code())
            }
            Err(malformed) => {
                tracing::warn!(
                    target: "kling_metrics",
                    http_status = status.as_u16(),
                    reason = malformed.reason(),
                    "kling call answered with no envelope"
                );
                Cow::Borrowed(labels::MALFORMED)
            }
        };
        let extensions = response.extensions();
        if let Some(&Attempt(attempts)) = extensions.get::<Attempt>() {
            span.record("attempt", attempts);
            if attempts > 1 {
                self.monitor
                    .note_requests(Instant::now(), u64::from(attempts - 1));
            }
        }
        if let Some(waited) = extensions.get::<Waited>() {
            span.record("wait_rate_limit_s", waited.rate_limit.as_secs_f64());
            span.record("wait_slots_s", waited.slots.as_secs_f64());
        }
        self.record(labels::status(status), code, span);
    }

    fn error(self, error: &(dyn StdError + 'static), span: &Span) {
        let (status, code) = match find_cause(error) {
            Some(Cause::Api(api)) => {
                span.record("request_id", api.request_id());
                if api.status() == StatusCode::TOO_MANY_REQUESTS {
                    self.monitor.note_rejection(api.code().as_i64());
                }
                (labels::status(api.status()), labels::code(api.code()))
            }
            Some(Cause::Malformed(status)) => {
                (labels::status(status), Cow::Borrowed(labels::MALFORMED))
            }
            None => (
                Cow::Borrowed(labels::NO_STATUS),
                Cow::Borrowed(labels::NO_CODE),
            ),
        };
        tracing::warn!(target: "kling_metrics", error = %error, "kling call failed");
        self.record(status, code, span);
    }

    fn record(self, status: Cow<'static, str>, code: Cow<'static, str>, span: &Span) {
        let elapsed = Instant::now().saturating_duration_since(self.start);
        let kind = self.kind.as_str();
        span.record("status", &*status);
        span.record("code", &*code);
        let seconds = elapsed.as_secs_f64();
        // The common case: every label is `'static`, and the keys are built once per
        // combination (see `labels::call_keys`) instead of once per call.
        if let (Cow::Borrowed(status), Cow::Borrowed(code), Some(pool)) =
            (&status, &code, labels::pool_static(self.pool.as_ref()))
        {
            static METADATA: metrics::Metadata<'static> =
                metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
            let keys = labels::call_keys(kind, pool, status, code);
            metrics::with_recorder(|recorder| {
                recorder
                    .register_histogram(&keys.duration, &METADATA)
                    .record(seconds);
                recorder
                    .register_counter(&keys.responses, &METADATA)
                    .increment(1);
            });
            return;
        }
        let status = SharedString::from(status);
        let code = SharedString::from(code);
        metrics::histogram!(
            REQUEST_DURATION,
            LABEL_KIND => kind,
            LABEL_POOL => labels::pool(self.pool.as_ref()),
            LABEL_STATUS => status,
            LABEL_CODE => code.clone(),
        )
        .record(seconds);
        metrics::counter!(RESPONSES, LABEL_KIND => kind, LABEL_CODE => code).increment(1);
    }
}

/// What an error says about the server's answer, if it came from one.
enum Cause<'a> {
    Api(&'a ApiError),
    Malformed(StatusCode),
}

/// Walks the source chain for a Kling error or a response that was not one.
fn find_cause<'a>(error: &'a (dyn StdError + 'static)) -> Option<Cause<'a>> {
    let mut current = Some(error);
    while let Some(err) = current {
        if let Some(api) = err.downcast_ref::<ApiError>() {
            return Some(Cause::Api(api));
        }
        if let Some(malformed) = err.downcast_ref::<MalformedResponse>() {
            return Some(Cause::Malformed(malformed.status()));
        }
        if let Some(large) = err.downcast_ref::<BodyTooLarge>() {
            return Some(Cause::Malformed(large.status()));
        }
        current = err.source();
    }
    None
}
