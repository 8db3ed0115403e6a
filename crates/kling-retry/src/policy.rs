//! What to do with one attempt's result: the [`Policy`] trait and Kling's rules.

use std::fmt;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use kling_core::error::{BodyTooLarge, BoxError, MalformedResponse, NotSent, Transport};
use kling_core::signals::{SlotGated, TokenDropped};
use kling_core::{Disposition, Outcome, RetryKind, SendState};

use crate::backoff::DelayKind;

/// One attempt's result, as a policy sees it.
#[derive(Clone, Copy)]
pub enum Attempted<'a> {
    /// A response, with its parsed [`Outcome`].
    Response(&'a Response<Full<Bytes>>, &'a Outcome),
    /// An error from the layers below (boxed; downcast to read it).
    Error(&'a BoxError),
}

impl fmt::Debug for Attempted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attempted::Response(_, outcome) => f
                .debug_tuple("Response")
                .field(&outcome.status())
                .field(&outcome.code())
                .finish(),
            Attempted::Error(error) => f.debug_tuple("Error").field(error).finish(),
        }
    }
}

/// Whether a failed create may nevertheless have made a (billed) task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CreateState {
    /// Surely not: the request never left (connect failure) or was refused before any work
    /// (`1302`, `1303`, `5001` maintenance). A create may be sent again.
    NotCreated,
    /// Perhaps: `5000`, `5002`, an undocumented 5xx code, a 5xx without a Kling envelope, a
    /// timeout, a reset after sending. A create is sent again only if it carries an
    /// `external_task_id`, and only after a lookup by that id finds no task; a `POST` the
    /// layer does not recognise (it may be a create) is not sent again.
    MaybeCreated,
}

/// A policy's verdict on one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Verdict {
    /// Return the result to the caller: a success as it is, a Kling error response as
    /// [`Failed`](crate::error::Failed), an error from below unchanged.
    Return,
    /// Try again, if the attempt limit, the deadline and the budget allow.
    Retry {
        /// Which backoff to wait (a `Retry-After` on the response overrides it).
        delay: DelayKind,
        /// Whether a create may have happened (non-creates are always safe to repeat).
        create: CreateState,
    },
}

/// Decides, from each attempt's result, whether to retry.
///
/// The layer does the rest: the `Retry-After` hint, the backoff, the attempt limit, the
/// deadline, the budget, and the duplicate-create rules (driven by [`Verdict::Retry`]'s
/// `create`). Implement it to retry more or less than [`KlingPolicy`]; delegating to
/// `KlingPolicy` for the cases you do not change keeps Kling's rules.
pub trait Policy: Send + Sync + 'static {
    /// Judges one attempt.
    fn judge(&self, attempted: Attempted<'_>) -> Verdict;
}

/// Kling's rules, from the [`Outcome`] (never from the status alone).
///
/// | result | verdict |
/// |---|---|
/// | code 0 | return |
/// | `1302` | retry, [`Throttled`](DelayKind::Throttled), not created |
/// | `1303` with [`SlotGated`] (a slots layer below will hold the retry) | retry, [`Immediate`](DelayKind::Immediate), not created |
/// | `1303` without | retry, [`SlotFull`](DelayKind::SlotFull) (≥ 1 s), not created |
/// | `5000`, `5002`, another 5xx code | retry, [`Transient`](DelayKind::Transient), maybe created |
/// | `5001` | retry, [`Maintenance`](DelayKind::Maintenance), not created (maintenance refuses the request; [`Code::may_have_created`](kling_core::Code::may_have_created), the table every layer reads) |
/// | `1003`, `1004` with [`TokenDropped`] (an auth layer below dropped the refused token) | retry, [`Immediate`](DelayKind::Immediate), not created (once per call) |
/// | `1003`, `1004` without (the auth layer below already re-signed once) | return |
/// | `1000`–`1002`, `1100`–`1103`, `1200`–`1203`, `1300`, `1301`, `1304`, other codes below 500 | return |
/// | a refusal below the classify step ([`RefusedBeforeSending`](kling_core::error::RefusedBeforeSending) in its chain: a base URL refusing another origin), which the classify step passes up as it is, or a hand-built [`Transport`] wrapping one | return (the same request would be refused again) |
/// | a client's refusal of the request itself, never sent and refused again on every attempt ([`will_recur`](kling_core::error::will_recur): with kling-core's `hyper-util` feature, hyper-util's refusal of an HTTP/2 request on an HTTP/1 connection, of a relative URI) | return, at once (no backoff, no budget); it reads as never sent |
/// | [`Transport`] error, never sent ([`SendState::NotSent`], [`NotSent`]) | retry, transient, not created |
/// | [`Transport`] error after sending, `tower::timeout::error::Elapsed` | retry, transient, maybe created |
/// | [`MalformedResponse`] or [`BodyTooLarge`] with a 5xx status (no Kling envelope, so no code says what happened) | retry, transient (503: maintenance), maybe created |
/// | [`MalformedResponse`] or [`BodyTooLarge`] with status 429 (a proxy's or gateway's page) | retry, [`Throttled`](DelayKind::Throttled), not created |
/// | any other error (a limiter's deadline error, a bad request, …) | return it unchanged |
///
/// What the layer then does with a retry whose `create` is
/// [`MaybeCreated`](CreateState::MaybeCreated):
///
/// | request | next step |
/// |---|---|
/// | not a create (a query, a list, any `GET`) | sent again |
/// | a create with an external id | looked up by that id: found, the task is the result ([`Recovered`](crate::Recovered)); `1203` or a new-style `data: []`, sent again; any other answer, judged like an attempt (a success naming no task it can read stops the call, unresolved) |
/// | a create without one, or a `POST` the router does not recognise (it may be a create endpoint newer than this crate) | stop: [`StopReason::CreateMayHaveHappened`](crate::error::StopReason::CreateMayHaveHappened) |
///
/// Once an attempt of a create may have made a task, a final refusal of a later attempt (say
/// `1201` "duplicate external task id": the first create landed after all) is looked up
/// again before it is returned (found: the task; not found: the refusal, but for a
/// `1200`/`1201`, which may be the answer to the duplicate id of that task: looked up after
/// the settle time, and not found, the create is unresolved). Whenever the call
/// stops while such a lookup is pending (attempts, budget, a lookup refused for good, an
/// error from below), it ends with
/// [`StopReason::CreateUnresolved`](crate::error::StopReason::CreateUnresolved), or a
/// [`DeadlineExceeded`](crate::error::DeadlineExceeded) whose `may_have_created()` is true,
/// naming the external id to look the task up by.
#[derive(Clone, Copy, Debug, Default)]
pub struct KlingPolicy;

impl Policy for KlingPolicy {
    fn judge(&self, attempted: Attempted<'_>) -> Verdict {
        match attempted {
            Attempted::Response(response, outcome) => judge_outcome(response, outcome),
            Attempted::Error(error) => judge_error(error),
        }
    }
}

fn judge_outcome(response: &Response<Full<Bytes>>, outcome: &Outcome) -> Verdict {
    let (delay, create) = match outcome.disposition() {
        Disposition::Retry(kind) => {
            let delay = match kind {
                RetryKind::Throttled => DelayKind::Throttled,
                RetryKind::Maintenance => DelayKind::Maintenance,
                _ => DelayKind::Transient,
            };
            // The one table every layer reads: `5000`, `5002` and undocumented codes may have
            // created a task; `1302` and `5001` (maintenance) did not.
            let create = if outcome.may_have_created() {
                CreateState::MaybeCreated
            } else {
                CreateState::NotCreated
            };
            (delay, create)
        }
        Disposition::Resign if response.extensions().get::<TokenDropped>().is_some() => {
            (DelayKind::Immediate, CreateState::NotCreated)
        }
        Disposition::WaitForSlot => {
            let delay = if response.extensions().get::<SlotGated>().is_some() {
                DelayKind::Immediate
            } else {
                DelayKind::SlotFull
            };
            (delay, CreateState::NotCreated)
        }
        _ => return Verdict::Return,
    };
    Verdict::Retry { delay, create }
}

fn judge_error(error: &BoxError) -> Verdict {
    // The client refused the request itself (its version, a relative URI): every retry would
    // be refused the same way.
    if kling_core::error::will_recur(&**error) {
        return Verdict::Return;
    }
    let by_status = |status: http::StatusCode| {
        if status == http::StatusCode::SERVICE_UNAVAILABLE {
            Some(DelayKind::Maintenance)
        } else if status.is_server_error() {
            Some(DelayKind::Transient)
        } else {
            None
        }
    };
    let (delay, create) = if let Some(transport) = error.downcast_ref::<Transport>() {
        // A refusal under the classify step that a hand-built `Transport` wraps: the classify
        // step itself passes one up as it is.
        if kling_core::error::refused_before_sending(transport) {
            return Verdict::Return;
        }
        let create = match transport.send_state() {
            SendState::NotSent => CreateState::NotCreated,
            _ => CreateState::MaybeCreated,
        };
        (DelayKind::Transient, create)
    } else if error.is::<NotSent>() {
        (DelayKind::Transient, CreateState::NotCreated)
    } else if error.is::<tower::timeout::error::Elapsed>() {
        (DelayKind::Transient, CreateState::MaybeCreated)
    } else if let Some(malformed) = error.downcast_ref::<MalformedResponse>() {
        if malformed.status() == http::StatusCode::TOO_MANY_REQUESTS {
            // A proxy's or a gateway's 429 page: the request was turned away before it was
            // handled (RFC 6585), so it is throttled, and nothing was made.
            (DelayKind::Throttled, CreateState::NotCreated)
        } else {
            match by_status(malformed.status()) {
                Some(delay) => (delay, CreateState::MaybeCreated),
                None => return Verdict::Return,
            }
        }
    } else if let Some(large) = error.downcast_ref::<BodyTooLarge>() {
        if large.status() == http::StatusCode::TOO_MANY_REQUESTS {
            // A 429 whose page is too long to read is a 429 page all the same (above).
            (DelayKind::Throttled, CreateState::NotCreated)
        } else {
            match by_status(large.status()) {
                Some(delay) => (delay, CreateState::MaybeCreated),
                None => return Verdict::Return,
            }
        }
    } else {
        return Verdict::Return;
    };
    Verdict::Retry { delay, create }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy's input is logged by its `Debug`: the status and the code, never the body or
    /// the headers (which may carry ids or a token).
    #[test]
    fn an_attempt_shows_its_status_and_code_only() {
        let body = br#"{"code":1302,"message":"too fast","request_id":"secret-req"}"#;
        let status = http::StatusCode::TOO_MANY_REQUESTS;
        let outcome = Outcome::parse(
            status,
            &http::HeaderMap::new(),
            body,
            tokio::time::Instant::now(),
        )
        .unwrap();
        let mut response = Response::new(Full::new(Bytes::from_static(body)));
        *response.status_mut() = status;
        let text = format!("{:?}", Attempted::Response(&response, &outcome));
        assert_eq!(text, "Response(429, RateLimited)");
        let error: BoxError = Box::new(NotSent::new("refused"));
        let text = format!("{:?}", Attempted::Error(&error));
        assert!(text.starts_with("Error(NotSent"), "{text}");
    }

    fn judge(error: impl Into<BoxError>) -> Verdict {
        KlingPolicy.judge(Attempted::Error(&error.into()))
    }

    fn retry(delay: DelayKind, create: CreateState) -> Verdict {
        Verdict::Retry { delay, create }
    }

    /// A page that is no Kling envelope, as the classify step reports it.
    fn page(status: u16) -> MalformedResponse {
        let status = http::StatusCode::from_u16(status).unwrap();
        Outcome::parse(
            status,
            &http::HeaderMap::new(),
            b"<html>gateway</html>",
            tokio::time::Instant::now(),
        )
        .unwrap_err()
    }

    /// Errors with no Kling code: whether a create may be sent again, and how long to wait.
    #[test]
    fn errors_are_judged_by_what_they_prove_was_sent() {
        use CreateState::{MaybeCreated, NotCreated};
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        // Never sent, whether wrapped by the classify step or not: a create may go again.
        assert_eq!(
            judge(Transport::new(refused)),
            retry(DelayKind::Transient, NotCreated)
        );
        assert_eq!(
            judge(NotSent::new("pool closed")),
            retry(DelayKind::Transient, NotCreated)
        );
        assert_eq!(
            judge(Transport::new(reset)),
            retry(DelayKind::Transient, MaybeCreated)
        );
        assert_eq!(
            judge(tower::timeout::error::Elapsed::new()),
            retry(DelayKind::Transient, MaybeCreated)
        );
        let local = Transport::new(kling_core::error::RefusedBeforeSending);
        assert_eq!(judge(local), Verdict::Return);
        assert_eq!(judge("a bad request"), Verdict::Return);
    }

    /// A proxy's or a gateway's page: its 429 was turned away before any work (throttled,
    /// at least a second); a 5xx may hide a create; any other status is final.
    #[test]
    fn a_page_without_an_envelope_is_judged_by_its_status() {
        use CreateState::{MaybeCreated, NotCreated};
        assert_eq!(judge(page(429)), retry(DelayKind::Throttled, NotCreated));
        assert_eq!(
            judge(page(503)),
            retry(DelayKind::Maintenance, MaybeCreated)
        );
        for status in [500, 502, 504, 599] {
            assert_eq!(
                judge(page(status)),
                retry(DelayKind::Transient, MaybeCreated),
                "{status}"
            );
        }
        for status in [200, 400, 403, 404, 413] {
            assert_eq!(judge(page(status)), Verdict::Return, "{status}");
        }
    }

    /// An oversize answer was not read, so nothing proves a 5xx made no task: a create behind
    /// one is never sent again blindly.
    #[tokio::test]
    async fn an_oversize_answer_is_judged_by_its_status() {
        use CreateState::MaybeCreated;
        use kling_core::ClassifyLayer;
        use tower::{Layer, ServiceExt};
        let too_large = |status: u16| async move {
            let below = tower::service_fn(move |_: http::Request<Full<Bytes>>| async move {
                let body = Full::new(Bytes::from(vec![b' '; 64]));
                let mut response = Response::new(body);
                *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                Ok::<_, BoxError>(response)
            });
            let error = ClassifyLayer::new()
                .max_body_bytes(8)
                .layer(below)
                .oneshot(http::Request::new(Full::default()))
                .await
                .unwrap_err();
            assert!(error.is::<BodyTooLarge>(), "{error}");
            KlingPolicy.judge(Attempted::Error(&error))
        };
        assert_eq!(
            too_large(503).await,
            retry(DelayKind::Maintenance, MaybeCreated)
        );
        for status in [500, 502, 504] {
            assert_eq!(
                too_large(status).await,
                retry(DelayKind::Transient, MaybeCreated),
                "{status}"
            );
        }
        // A 429 page too long to read is throttling, as a short one is.
        assert_eq!(
            too_large(429).await,
            retry(DelayKind::Throttled, CreateState::NotCreated)
        );
        for status in [200, 404, 413] {
            assert_eq!(too_large(status).await, Verdict::Return, "{status}");
        }
    }
}
