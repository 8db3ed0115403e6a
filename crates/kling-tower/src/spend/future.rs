//! The [`SpendGuard`](super::SpendGuard) response future.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use kling_core::error::ApiError;
use kling_core::signals::SendWatch;
use kling_core::{AccountId, BoxError, Code, Outcome};
use kling_retry::error::{DeadlineExceeded, Failed, StopReason};
use pin_project_lite::pin_project;

use super::{Ledger, Nanos, kept_id};
use crate::error::BudgetExceeded;

/// A create's reservation, settled by its response.
pub(crate) struct Settle {
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) account: Option<AccountId>,
    /// What was reserved, as the ledger counts.
    pub(crate) estimate: Nanos,
    /// The create's external id as the guard recognised it (the caller's), [as the ledger
    /// keeps it](super::kept_id), to remember it by should its outcome be unknown.
    pub(crate) external_id: Option<String>,
    /// Whether the layers below held the create back unsent, read if the caller drops it.
    pub(crate) watch: SendWatch,
}

impl Settle {
    /// Settles a create given up before its answer: its estimate goes back if the layers
    /// below held it back unsent, and is kept otherwise (it may have reached the server).
    pub(crate) fn dropped(self) {
        let sent_id = self.external_id.as_deref();
        if self.watch.never_sent() {
            self.ledger.release(&self.account, self.estimate, sent_id);
        } else {
            let kept = self.external_id.clone();
            self.ledger
                .kept(&self.account, self.estimate, sent_id, kept);
        }
    }
}

/// A reservation while the inner service's `call` runs: settled as [dropped](Settle::dropped)
/// should that call panic, which leaves no future to settle it. Left open, it was carried into
/// every later period.
pub(crate) struct Calling(pub(crate) Option<Settle>);

impl Drop for Calling {
    fn drop(&mut self) {
        if let Some(settle) = self.0.take() {
            settle.dropped();
        }
    }
}

pin_project! {
    /// Refuses an over-budget create at once, or waits for the inner response and settles the
    /// create's reservation (or reads task costs from a query's answer).
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        /// A create dropped before its answer keeps its estimate (it may have reached the
        /// server), unless the layers below held it back from its first attempt and never sent
        /// it (a caller's timeout while it waited for a slot): then no task can exist.
        fn drop(this: Pin<&mut Self>) {
            if let StateProj::Create { settle, .. } = this.project().state.project()
                && let Some(settle) = settle.take()
            {
                settle.dropped();
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Refused { error: Option<BudgetExceeded> },
        Create { #[pin] future: F, settle: Option<Settle> },
        Other { #[pin] future: F, observe: Option<(Arc<Ledger>, Option<AccountId>)> },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn refused(error: BudgetExceeded) -> Self {
        ResponseFuture {
            state: State::Refused { error: Some(error) },
        }
    }

    pub(crate) fn create(future: F, settle: Settle) -> Self {
        ResponseFuture {
            state: State::Create {
                future,
                settle: Some(settle),
            },
        }
    }

    pub(crate) fn observe(future: F, observe: Option<(Arc<Ledger>, Option<AccountId>)>) -> Self {
        ResponseFuture {
            state: State::Other { future, observe },
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Full<Bytes>>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Full<Bytes>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Refused { error } => Poll::Ready(Err(match error.take() {
                Some(error) => Box::new(error),
                None => "polled after completion".into(),
            })),
            StateProj::Create { future, settle } => {
                let result = ready!(future.poll(cx)).map_err(Into::into);
                let Some(settle) = settle.take() else {
                    return Poll::Ready(result);
                };
                let Settle {
                    ledger,
                    account,
                    estimate,
                    external_id,
                    ..
                } = settle;
                // The caller's external id, as reserved.
                let sent_id = external_id.as_deref();
                match result {
                    Ok(mut response) => {
                        match Outcome::ensure(&mut response) {
                            Ok(outcome) if outcome.is_success() => match outcome.task() {
                                Some(task) => ledger.created(&account, estimate, sent_id, task),
                                // A success without a task id keeps its estimate.
                                None => {
                                    ledger.kept(&account, estimate, sent_id, external_id.clone())
                                }
                            },
                            Ok(outcome) if !outcome.may_have_created() => {
                                ledger.release(&account, estimate, sent_id);
                            }
                            // 5000/5002, an unknown code or an unreadable body: the task may
                            // exist and be billed.
                            _ => ledger.kept(&account, estimate, sent_id, external_id.clone()),
                        }
                        Poll::Ready(Ok(response))
                    }
                    Err(error) => {
                        if made_no_task(&*error) {
                            ledger.release(&account, estimate, sent_id);
                        } else {
                            // The id a retry layer below looks the create up by: the caller's,
                            // or one it generated, which the request never showed here.
                            let named =
                                retry_external_id(&*error).map(|id| kept_id(id).into_owned());
                            let kept = named.or_else(|| external_id.clone());
                            ledger.kept(&account, estimate, sent_id, kept);
                        }
                        Poll::Ready(Err(error))
                    }
                }
            }
            StateProj::Other { future, observe } => {
                let mut response = ready!(future.poll(cx)).map_err(Into::into)?;
                if let Some((ledger, account)) = observe.take()
                    && let Ok(outcome) = Outcome::ensure(&mut response)
                {
                    ledger.observe(&account, outcome.tasks());
                }
                Poll::Ready(Ok(response))
            }
        }
    }
}

/// Whether a create that failed with `error` surely made no task, so its estimate goes back.
///
/// A retry layer below (the stack's) answers every refusal with an error, not a response:
/// [`Failed`] or [`DeadlineExceeded`], holding the last Kling answer. The estimate goes back
/// when that answer's code cannot have created a task (or the last request never left) and no
/// earlier attempt may have made one: the retry layer stopped because the answer was final,
/// or its attempts or budget ran out, or the server asked for a longer wait than it waits out
/// or than the deadline leaves, and says no create is left unresolved
/// ([`Failed::may_have_created`], [`DeadlineExceeded::may_have_created`]). Any other reason
/// keeps the estimate. Without a retry layer, the error is read by
/// [`kling_core::error::may_have_created`]: a Kling error by its code, a request never sent or
/// refused before sending, a proxy's 4xx page.
fn made_no_task(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(link) = current {
        if let Some(failed) = link.downcast_ref::<Failed>() {
            let settled = matches!(
                failed.reason(),
                StopReason::NotRetryable
                    | StopReason::AttemptsExhausted
                    | StopReason::BudgetExhausted
                    | StopReason::RetryAfterTooLong
            );
            return settled && !failed.may_have_created() && last_made_none(failed.api_error());
        }
        if let Some(late) = link.downcast_ref::<DeadlineExceeded>() {
            return !late.may_have_created() && last_made_none(late.api_error());
        }
        current = link.source();
    }
    !kling_core::error::may_have_created(error)
}

/// The external id a retry layer's error names for a create that may have made a task
/// ([`Failed::external_id`], [`DeadlineExceeded::external_id`]): the caller's, or the `kr-…` one
/// the layer generated and wrote into the create below the guard.
fn retry_external_id<'e>(error: &'e (dyn StdError + 'static)) -> Option<&'e str> {
    let mut current = Some(error);
    while let Some(link) = current {
        if let Some(failed) = link.downcast_ref::<Failed>() {
            return failed.external_id();
        }
        if let Some(late) = link.downcast_ref::<DeadlineExceeded>() {
            return late.external_id();
        }
        current = link.source();
    }
    None
}

/// Whether a retry layer's last failure made no task, once the layer said no create is left
/// unresolved: a Kling answer that cannot have created one. A failure that is no Kling answer
/// (never sent, refused before sending, a page, a reset) is settled by that word already: the
/// layer counts a create whose failure may have made a task as unresolved.
fn last_made_none(api: Option<&ApiError>) -> bool {
    api.is_none_or(cannot_have_created)
}

/// A refusal that cannot have created a task (not a success; see [`ApiError::may_have_created`]).
fn cannot_have_created(api: &ApiError) -> bool {
    api.code() != Code::Success && !api.may_have_created()
}
