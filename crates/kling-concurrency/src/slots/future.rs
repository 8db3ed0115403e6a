//! The [`TaskSlots`](super::TaskSlots) response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use kling_core::error::{ApiError, BoxError, SendState};
use kling_core::signals::{SlotGated, Waited};
use kling_core::{ApiGeneration, Code, Outcome, Pool, Recognized, metrics as names};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::backend::{Reservation, SlotBackend, SlotOp, TaskRef, TaskUpdate};
use crate::error::DeadlineExceeded;

/// What a create carries from `call` to the end of its response.
pub(crate) struct Ctx<B> {
    pub(crate) backend: B,
    pub(crate) lease: Duration,
    pub(crate) external: Option<String>,
    pub(crate) pool: Pool,
    pub(crate) weight: u32,
}

impl<B: SlotBackend> Ctx<B> {
    /// Keeps the slots of a create whose outcome is unknown: under its external id, or else
    /// under a lease alone.
    /// Moves the external id out: a create is settled once.
    fn keep_unknown(&mut self, reservation: Reservation) -> SlotOp {
        SlotOp::Hold {
            reservation,
            task: TaskRef {
                id: None,
                external_id: self.external.take(),
            },
            lease: self.lease,
        }
    }
}

pin_project! {
    /// Waits for slots (creates), calls the inner service, and settles the slots from the
    /// response.
    pub struct ResponseFuture<S, ReqB, B>
    where
        S: Service<Request<ReqB>>,
        B: SlotBackend,
    {
        #[pin]
        state: State<S, ReqB, B>,
    }

    impl<S, ReqB, B> PinnedDrop for ResponseFuture<S, ReqB, B>
    where
        S: Service<Request<ReqB>>,
        B: SlotBackend,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let StateProj::Create { reservation, ctx, .. } = this.state.project()
                && let Some(reservation) = reservation.take()
                && let Some(mut ctx) = ctx.take()
            {
                // The create was handed to the inner service and may have reached the server:
                // the task would run on regardless, so its slots stay held (under its external
                // id, or its lease).
                let op = ctx.keep_unknown(reservation);
                drop(ctx.backend.apply(op));
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB, B>
    where
        S: Service<Request<ReqB>>,
        B: SlotBackend,
    {
        Acquire {
            acquire: B::Acquire,
            inner: Option<S>,
            request: Option<Request<ReqB>>,
            ctx: Option<Ctx<B>>,
            deadline: Option<Instant>,
            sleep: Option<Pin<Box<Sleep>>>,
            since: Option<Instant>,
        },
        Create {
            #[pin]
            future: S::Future,
            reservation: Option<Reservation>,
            ctx: Option<Ctx<B>>,
            waited: Duration,
        },
        Observe {
            #[pin]
            future: S::Future,
            backend: B,
            lease: Duration,
            asked: Option<Uri>,
        },
        Pass {
            #[pin]
            future: S::Future,
        },
        Settle {
            apply: B::Apply,
            output: Option<Result<Response<Full<Bytes>>, BoxError>>,
        },
        Done,
    }
}

impl<S, ReqB, B> fmt::Debug for ResponseFuture<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: SlotBackend,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Acquire { .. } => "acquire",
            State::Create { .. } => "create",
            State::Observe { .. } => "observe",
            State::Pass { .. } => "pass",
            State::Settle { .. } => "settle",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, ReqB, B> ResponseFuture<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: SlotBackend,
{
    pub(crate) fn create(
        acquire: B::Acquire,
        inner: S,
        request: Request<ReqB>,
        ctx: Ctx<B>,
        deadline: Option<Instant>,
    ) -> Self {
        ResponseFuture {
            state: State::Acquire {
                acquire,
                inner: Some(inner),
                request: Some(request),
                ctx: Some(ctx),
                deadline,
                sleep: None,
                since: None,
            },
        }
    }

    pub(crate) fn observe(
        future: S::Future,
        backend: B,
        lease: Duration,
        asked: Option<Uri>,
    ) -> Self {
        ResponseFuture {
            state: State::Observe {
                future,
                backend,
                lease,
                asked,
            },
        }
    }

    pub(crate) fn pass(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Pass { future },
        }
    }
}

/// What a create's result means for its slots.
fn settle_create<B: SlotBackend>(
    result: Result<Response<Full<Bytes>>, BoxError>,
    reservation: Reservation,
    ctx: &mut Ctx<B>,
    waited: Duration,
) -> (SlotOp, Result<Response<Full<Bytes>>, BoxError>) {
    let mut response = match result {
        Ok(response) => response,
        Err(error) => {
            let op = match SendState::of(&*error) {
                SendState::NotSent => SlotOp::GiveBack(reservation),
                _ => ctx.keep_unknown(reservation),
            };
            return (op, Err(error));
        }
    };
    let outcome = match Outcome::ensure(&mut response) {
        Ok(outcome) => outcome,
        // An answer nobody can read: the create may have happened.
        Err(malformed) => return (ctx.keep_unknown(reservation), Err(Box::new(malformed))),
    };
    if !waited.is_zero() {
        match response.extensions_mut().get_mut::<Waited>() {
            Some(w) => w.slots += waited,
            None => {
                response.extensions_mut().insert(Waited {
                    slots: waited,
                    ..Waited::default()
                });
            }
        }
    }
    let code = outcome.code();
    let op = if outcome.is_success() {
        match outcome.task() {
            Some(task) if task.status.is_terminal() => SlotOp::GiveBack(reservation),
            Some(task) => SlotOp::Hold {
                reservation,
                task: TaskRef {
                    id: Some(task.id.clone()),
                    external_id: match &task.external_id {
                        Some(external) => Some(external.clone()),
                        None => ctx.external.take(),
                    },
                },
                lease: ctx.lease,
            },
            None => ctx.keep_unknown(reservation),
        }
    } else if code == Code::ParallelTaskLimit {
        response.extensions_mut().insert(SlotGated);
        SlotOp::Congested(reservation)
    } else if code.halts_creates() {
        SlotOp::Halt {
            reservation,
            cause: ApiError::from_outcome(&outcome),
        }
    } else if code.may_have_created() && ctx.external.is_some() {
        ctx.keep_unknown(reservation)
    } else {
        SlotOp::GiveBack(reservation)
    };
    (op, Ok(response))
}

/// The external ids a query asked about that its answer says do not exist, as updates that
/// end what is held under them (`None` when the query was no lookup by external id or the answer
/// does not say).
///
/// A lookup by external id is legacy `GET {create path}/{id}` (the id may be a task id or an
/// external id: only a holding under that external id is ended) or new-style
/// `GET /tasks?external_task_ids=…`. "Absent" is `1203` (not found), or a successful answer
/// that reports other tasks, each with its external id.
fn absent(uri: &Uri, outcome: &Outcome) -> Option<Vec<TaskUpdate>> {
    // Cheap tests first: this runs on every query's answer.
    let by_external = uri
        .query()
        .is_some_and(|q| q.contains("external_task_ids="));
    let not_found = outcome.code() == Code::NotFound;
    let none_listed = by_external
        && outcome.is_success()
        && outcome.tasks().iter().all(|t| t.external_id.is_some());
    if !(not_found || none_listed) {
        return None;
    }
    let recognized = Recognized::from_parts(&Method::GET, uri, b"");
    let asked = if by_external {
        recognized.external_ids
    } else if recognized.generation == Some(ApiGeneration::Legacy) {
        // A single-task legacy query names one id in its path (`not_found` holds here).
        recognized.task_ids
    } else {
        return None;
    };
    let updates: Vec<TaskUpdate> = asked
        .into_iter()
        .filter(|ext| {
            !outcome
                .tasks()
                .iter()
                .any(|t| t.external_id.as_deref() == Some(ext.as_str()))
        })
        .map(|ext| TaskUpdate {
            // No task id: only a holding under this external id is ended.
            id: String::new(),
            external_id: Some(ext),
            status: None,
        })
        .collect();
    (!updates.is_empty()).then_some(updates)
}

impl<S, ReqB, B> Future for ResponseFuture<S, ReqB, B>
where
    S: Service<Request<ReqB>, Response = Response<Full<Bytes>>>,
    S::Error: Into<BoxError>,
    B: SlotBackend,
{
    type Output = Result<Response<Full<Bytes>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Acquire {
                    acquire,
                    inner,
                    request,
                    ctx,
                    deadline,
                    sleep,
                    since,
                } => {
                    let reservation = match Pin::new(acquire).poll(cx) {
                        Poll::Ready(Ok(reservation)) => reservation,
                        Poll::Ready(Err(error)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into_box()));
                        }
                        Poll::Pending => {
                            let now = Instant::now();
                            let started = *since.get_or_insert(now);
                            if let Some(deadline) = *deadline {
                                let late = deadline <= now || {
                                    let sleep = sleep.get_or_insert_with(|| {
                                        Box::pin(tokio::time::sleep_until(deadline))
                                    });
                                    sleep.as_mut().poll(cx).is_ready()
                                };
                                if late {
                                    let ctx = ctx.take().expect("ctx is taken once");
                                    let waited = now.saturating_duration_since(started);
                                    // Dropping the acquire future leaves the queue.
                                    this.state.set(State::Done);
                                    return Poll::Ready(Err(Box::new(DeadlineExceeded::new(
                                        ctx.pool, ctx.weight, waited,
                                    ))));
                                }
                            }
                            return Poll::Pending;
                        }
                    };
                    let waited = match since {
                        Some(since) => {
                            let waited = Instant::now().saturating_duration_since(*since);
                            if let Some(ctx) = ctx.as_ref() {
                                metrics::histogram!(names::SLOTS_WAIT, names::LABEL_POOL => ctx.pool.to_string())
                                    .record(waited.as_secs_f64());
                            }
                            waited
                        }
                        None => Duration::ZERO,
                    };
                    let mut inner = inner.take().expect("inner is taken once");
                    let request = request.take().expect("request is taken once");
                    let ctx = ctx.take();
                    let future = inner.call(request);
                    this.state.set(State::Create {
                        future,
                        reservation: Some(reservation),
                        ctx,
                        waited,
                    });
                }
                StateProj::Create {
                    future,
                    reservation,
                    ctx,
                    waited,
                } => {
                    let result = ready!(future.poll(cx)).map_err(Into::into);
                    let reservation = reservation.take().expect("reservation is taken once");
                    let mut ctx = ctx.take().expect("ctx is taken once");
                    let (op, output) = settle_create(result, reservation, &mut ctx, *waited);
                    let apply = ctx.backend.apply(op);
                    this.state.set(State::Settle {
                        apply,
                        output: Some(output),
                    });
                }
                StateProj::Observe {
                    future,
                    backend,
                    lease,
                    asked,
                } => {
                    let mut response = match ready!(future.poll(cx)) {
                        Ok(response) => response,
                        Err(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    };
                    let outcome = match Outcome::ensure(&mut response) {
                        Ok(outcome) => outcome,
                        Err(_) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(response));
                        }
                    };
                    if let Some(mut updates) = asked.as_ref().and_then(|uri| absent(uri, &outcome))
                    {
                        // The server says these external ids name no task: the creates held
                        // under them never happened, and their slots go back now (the create
                        // sent again waits for slots like any other). The tasks the answer does
                        // report are handled as always, in the same change.
                        updates.extend(outcome.tasks().iter().map(TaskUpdate::from_report));
                        let apply = backend.apply(SlotOp::Update {
                            updates,
                            lease: *lease,
                        });
                        this.state.set(State::Settle {
                            apply,
                            output: Some(Ok(response)),
                        });
                        continue;
                    }
                    if outcome.tasks().is_empty() {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    }
                    let apply = backend.apply(SlotOp::Observed {
                        outcome,
                        lease: *lease,
                    });
                    this.state.set(State::Settle {
                        apply,
                        output: Some(Ok(response)),
                    });
                }
                StateProj::Pass { future } => {
                    let output = ready!(future.poll(cx)).map_err(Into::into);
                    this.state.set(State::Done);
                    return Poll::Ready(output);
                }
                StateProj::Settle { apply, output } => {
                    if let Err(error) = ready!(Pin::new(apply).poll(cx)) {
                        // The response is real; losing it over bookkeeping would make callers
                        // repeat a create that happened. Leases bound the damage.
                        tracing::warn!(%error, "task slot state not updated");
                    }
                    let output = output.take().expect("output is taken once");
                    this.state.set(State::Done);
                    return Poll::Ready(output);
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}
