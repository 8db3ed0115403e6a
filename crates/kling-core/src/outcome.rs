//! [`Outcome`]: what one response says, parsed once and shared by every layer.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;

use crate::body::PeekBody;
use crate::code::{Code, Disposition};
use crate::envelope::{Envelope, TaskReport};
use crate::error::{ApiError, MalformedResponse};
use crate::retry_after::retry_after_delay;

/// What one response says: status, business code, message, request id, the tasks it reports
/// and any `Retry-After`.
///
/// [`ClassifyLayer`](crate::ClassifyLayer) parses it once per response and puts it in the
/// response's extensions; every layer above reads it from there ([`Outcome::of`]). Cloning is
/// cheap (the parsed data sits behind an `Arc`).
#[derive(Clone, Debug)]
pub struct Outcome {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    status: StatusCode,
    envelope: Envelope,
    retry_after: Option<Duration>,
    received_at: Instant,
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
        let envelope = Envelope::parse(body).map_err(|e| {
            let reason = if body.is_empty() {
                "empty body".to_owned()
            } else {
                e.to_string()
            };
            MalformedResponse::new(status, reason)
        })?;
        Ok(Outcome {
            inner: Arc::new(Inner {
                status,
                envelope,
                // The system clock is only read for a `Retry-After` (an HTTP-date needs it).
                retry_after: if headers.contains_key(RETRY_AFTER) {
                    retry_after_delay(headers, SystemTime::now())
                } else {
                    None
                },
                received_at,
            }),
        })
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
        let outcome = Outcome::parse(response.status(), response.headers(), &body, Instant::now())?;
        response.extensions_mut().insert(outcome.clone());
        Ok(outcome)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.inner.status
    }

    /// The business code.
    pub fn code(&self) -> Code {
        self.inner.envelope.code
    }

    /// The server's message.
    pub fn message(&self) -> &str {
        &self.inner.envelope.message
    }

    /// The server's request id.
    pub fn request_id(&self) -> Option<&str> {
        self.inner.envelope.request_id.as_deref()
    }

    /// The tasks the response reports (one for a create or single query, several for lists
    /// and batch queries).
    pub fn tasks(&self) -> &[TaskReport] {
        &self.inner.envelope.tasks
    }

    /// The first task reported, e.g. the task a create made.
    pub fn task(&self) -> Option<&TaskReport> {
        self.inner.envelope.tasks.first()
    }

    /// The parsed envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.inner.envelope
    }

    /// What a client should do, from the code and (for unknown codes) the status.
    pub fn disposition(&self) -> Disposition {
        self.code().disposition(self.status())
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
