//! The [`TaskSlots`](super::TaskSlots) response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kling_core::lanes::Lane;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use kling_core::error::{ApiError, BoxError};
use kling_core::signals::{Deadline, HaltGate, SendWatch, SlotGated, Waited};
use kling_core::{
    AccountId, ApiGeneration, Code, Outcome, PoolScope, Recognized, metrics as names,
};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::backend::{
    Applied, CreatePath, ReportPath, Reservation, SlotBackend, SlotOp, TaskUpdate,
};
use crate::error::BackendError;
use crate::error::DeadlineExceeded;
use crate::id::SmallId;

/// What a granted create carries until its response settles its slots. Kept small: it sits in
/// every create's response future, which each layer above moves.
pub(crate) struct Held<B> {
    pub(crate) reservation: Reservation,
    /// The sending thread's lane of the backend (see `TaskSlots`'s `backend`).
    pub(crate) backend: Arc<Lane<B>>,
    pub(crate) lease: Duration,
    /// The create's own external id (copied inline: no allocation).
    pub(crate) external: Option<SmallId>,
    /// The path it is sent to, where its external id is unique (with an external id only).
    pub(crate) path: CreatePath,
    /// How long the create waited for its slots (zero on the fast path).
    pub(crate) waited: Duration,
    /// Whether a layer below holds the create back unsent ([`SendWatch::never_sent`]): read
    /// when the caller drops it, so slots of a create that never left go back.
    pub(crate) watch: SendWatch,
}

/// The watch a granted create's slots are judged by if the caller drops it
/// ([`Held::watch`]): the request's ([`SendWatch::shared`]), unless an earlier attempt of it
/// may have made a task.
///
/// A watch is per request, not per attempt, and once an attempt may have made a task it is
/// final ([`SendWatch::may_have_made`]): a layer below that holds a later attempt back unsent
/// (the rate limiter) can no longer say so in it, and that attempt's slots, dropped there,
/// were kept as an unknown outcome (under its external id, or its lease) for a create that
/// never left. Such an attempt gets a fresh watch in its own request, the one the layers below
/// report in; the request's watch, which the layers above read, was final already, so they
/// miss nothing. One atomic load for every create: a first attempt's watch is never final.
///
/// `held`: this layer holds the create back itself (a create that waited for its slots), and
/// says so in the fresh watch until it passes the create on. `gate`, the create's halt gate
/// (stamped before its grant), is put in the request's signals in the same lookup.
pub(crate) fn attempt_watch<ReqB>(
    request: &mut Request<ReqB>,
    held: bool,
    gate: Option<HaltGate>,
) -> SendWatch {
    let watch = HaltGate::set_with_watch(request, gate);
    if !watch.may_have_made() {
        return watch;
    }
    let fresh = SendWatch::watch(request);
    if held {
        SendWatch::held(request);
    }
    fresh
}

/// Keeps the slots of a create whose outcome is unknown: under its external id (on its create
/// path), or else under a lease alone.
fn keep_unknown<B: SlotBackend>(
    backend: &B,
    reservation: Reservation,
    external: Option<&SmallId>,
    lease: Duration,
    path: CreatePath,
) -> B::Apply {
    backend.hold_unread_on(
        reservation,
        None,
        external.map(SmallId::as_str),
        lease,
        None,
        path,
    )
}

/// A create that found no free slot in `call`: everything it needs once granted, boxed (one
/// allocation on a path that waits anyway) so the response future stays small. Its pool,
/// weight, external id and deadline are read from the request it holds (recognised in `call`)
/// when needed, so each waiter's box stays small too.
pub(crate) struct Waiting<S, ReqB, B: SlotBackend> {
    pub(crate) acquire: B::Acquire,
    /// A clone of the inner service, not readied (it reserves nothing below while the create
    /// waits): readied once the slots are granted, then called (taken).
    pub(crate) inner: Option<S>,
    pub(crate) request: Option<Request<ReqB>>,
    pub(crate) backend: Arc<Lane<B>>,
    pub(crate) lease: Duration,
    pub(crate) sleep: Option<Pin<Box<Sleep>>>,
    pub(crate) since: Instant,
    /// Which pool the create counts in (its recognised pool, or its product's).
    pub(crate) scope: PoolScope,
}

impl<S, ReqB, B> Waiting<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: SlotBackend,
{
    /// The create's recognition, cached in its request by `call`.
    fn recognized(&self) -> &Recognized {
        self.request
            .as_ref()
            .and_then(Recognized::cached)
            .expect("a waiting create holds its recognised request")
    }

    /// The create's [`DeadlineExceeded`] if its request's deadline has come, else `None`
    /// with the waker registered to be woken then (one timer, armed on the first wait).
    fn late(&mut self, cx: &mut Context<'_>) -> Option<DeadlineExceeded> {
        let deadline = self.request.as_ref().and_then(Deadline::of)?;
        let now = Instant::now();
        let late = deadline <= now || {
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            sleep.as_mut().poll(cx).is_ready()
        };
        if !late {
            return None;
        }
        let waited = now.saturating_duration_since(self.since);
        let recognized = self.recognized();
        let pool = recognized.pool.clone().expect("a create has a pool");
        let pool = self.scope.apply(pool);
        Some(DeadlineExceeded::new(
            pool,
            recognized.weight.max(1),
            waited,
        ))
    }

    /// Waits for the slots (or the deadline), and puts the grant in `held` (the response
    /// future's, which gives it back if the future is dropped, also in an unwind) before
    /// anything that may panic runs, such as a metrics recorder.
    fn poll_granted(
        &mut self,
        cx: &mut Context<'_>,
        held: &mut Option<Held<B>>,
    ) -> Poll<Result<(), BoxError>> {
        let reservation = match Pin::new(&mut self.acquire).poll(cx) {
            Poll::Ready(Ok(reservation)) => reservation,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into_box())),
            Poll::Pending => {
                return match self.late(cx) {
                    Some(late) => Poll::Ready(Err(Box::new(late))),
                    None => Poll::Pending,
                };
            }
        };
        let waited = Instant::now().saturating_duration_since(self.since);
        let request = self.request.as_mut().expect("a waiting create");
        // Its halt gate, stamped before it began to wait, is in its signals already.
        let watch = attempt_watch(request, true, None);
        let recognized = self.recognized();
        let external = recognized.external_id.as_deref().map(SmallId::new);
        let new_style = recognized.generation == Some(ApiGeneration::New);
        let path = self
            .request
            .as_ref()
            .map_or(CreatePath::UNKNOWN, |request| {
                super::service::create_path(new_style, external.is_some(), request.uri().path())
            });
        *held = Some(Held {
            reservation,
            backend: self.backend.clone(),
            lease: self.lease,
            external,
            path,
            waited,
            watch,
        });
        // Only now: a recorder that panics leaves the grant where the future gives it back.
        let recognized = self.recognized();
        let pool = recognized.pool.clone().map(|pool| self.scope.apply(pool));
        let pool = names::pool_label(pool.as_ref());
        metrics::histogram!(names::SLOTS_WAIT, names::LABEL_POOL => pool)
            .record(waited.as_secs_f64());
        Poll::Ready(Ok(()))
    }

    /// Readies the inner service for the granted create, then sends it; gives up at the
    /// request's deadline, as a wait for slots does (the caller gives the slots back).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<S::Future, BoxError>>
    where
        S::Error: Into<BoxError>,
    {
        let inner = self.inner.as_mut().expect("inner is taken once");
        if inner.poll_ready(cx).map_err(Into::into)?.is_pending() {
            return match self.late(cx) {
                Some(late) => Poll::Ready(Err(Box::new(late.after_grant()))),
                None => Poll::Pending,
            };
        }
        let mut inner = self.inner.take().expect("inner is taken once");
        let request = self.request.take().expect("request is taken once");
        SendWatch::handed(&request);
        Poll::Ready(Ok(inner.call(request)))
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
            match this.state.project() {
                StateProj::Create { held, .. } => {
                    if let Some(held) = held.take() {
                        let Held {
                            reservation,
                            backend,
                            lease,
                            external,
                            path,
                            watch,
                            ..
                        } = held;
                        if watch.never_sent() {
                            // A layer below (the rate limiter) still held it back: it never
                            // left, no task can exist, and the slots go back. (Read before the
                            // inner future is dropped, after this.)
                            drop(backend.apply_unread(SlotOp::GiveBack(reservation)));
                        } else {
                            // Handed on toward the server, it may have reached it: the task
                            // would run on regardless, so its slots stay held (under its
                            // external id, or its lease).
                            let external = external.as_ref();
                            drop(keep_unknown(&**backend, reservation, external, lease, path));
                        }
                    }
                }
                StateProj::Waiting { held, .. } => {
                    if let Some(held) = held.take() {
                        // Granted, and not sent (the inner service was not ready yet): the
                        // slots go back.
                        drop(held.backend.apply_unread(SlotOp::GiveBack(held.reservation)));
                    }
                }
                _ => {}
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
        Waiting {
            waiting: Box<Waiting<S, ReqB, B>>,
            // Set once the slots are granted, while the inner service is readied.
            held: Option<Held<B>>,
        },
        Create {
            #[pin]
            future: S::Future,
            held: Option<Held<B>>,
        },
        Observe {
            #[pin]
            future: S::Future,
            backend: Arc<Lane<B>>,
            lease: Duration,
            asked: Option<PathAndQuery>,
            account: AccountId,
            // Where its tasks were created, when the request says so without `asked`: every
            // new-style create (their external ids are looked up together), a legacy list's
            // create path; else unknown (a legacy query's is read from `asked`).
            path: CreatePath,
            // A list's answer: the ends it names of tasks not held here are long past.
            list: bool,
        },
        Pass {
            #[pin]
            future: S::Future,
        },
        Settle {
            apply: B::Apply,
            output: Option<Result<Response<Full<Bytes>>, BoxError>>,
        },
        Failed {
            error: Option<BoxError>,
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
            State::Waiting { .. } => "waiting",
            State::Create { .. } => "create",
            State::Observe { .. } => "observe",
            State::Pass { .. } => "pass",
            State::Settle { .. } => "settle",
            State::Failed { .. } => "failed",
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
    /// A create granted its slots in `call`, already handed to the inner service.
    pub(crate) fn create(future: S::Future, held: Held<B>) -> Self {
        ResponseFuture {
            state: State::Create {
                future,
                held: Some(held),
            },
        }
    }

    /// A create that waits for its slots.
    pub(crate) fn wait(waiting: Box<Waiting<S, ReqB, B>>) -> Self {
        ResponseFuture {
            state: State::Waiting {
                waiting,
                held: None,
            },
        }
    }

    /// A create refused before it was sent (halted account, too heavy for its pool).
    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
        }
    }

    /// A query or list of `account` sent: its answer's reports settle slots.
    pub(crate) fn observe(
        future: S::Future,
        backend: Arc<Lane<B>>,
        lease: Duration,
        asked: Option<PathAndQuery>,
        account: AccountId,
        (path, list): (CreatePath, bool),
    ) -> Self {
        ResponseFuture {
            state: State::Observe {
                future,
                backend,
                lease,
                asked,
                account,
                path,
                list,
            },
        }
    }

    pub(crate) fn pass(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Pass { future },
        }
    }
}

/// A create's grant while its result is read ([`settle_create`]), until the backend takes it:
/// should reading the result unwind (a `source` of an error from below that panics, say), the
/// grant is settled as far as was read, never lost. A create that may have made a task (the
/// result not read yet, an answer that says it may have) keeps its slots under its external
/// id or its lease, the safe side against `1303`; one whose answer said no task was made gives
/// them back. (Once the backend has the grant, a change of its own that panics is its own: a
/// grant is handed over exactly once, see [`SlotBackend`].)
struct Settling<'a, B: SlotBackend> {
    /// The response future's, read in place (the grant is not moved until it is handed on).
    held: &'a mut Option<Held<B>>,
    /// Whether the create may have made a task, as far as its result was read.
    made: bool,
}

impl<B: SlotBackend> Settling<'_, B> {
    /// The grant, to hand to the backend.
    #[inline(always)]
    fn take(&mut self) -> Held<B> {
        self.held.take().expect("a grant is settled once")
    }
}

impl<B: SlotBackend> Drop for Settling<'_, B> {
    #[inline]
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            unwound(held, self.made);
        }
    }
}

/// Settles the grant of a create whose result unwound while it was read ([`Settling`]).
#[cold]
fn unwound<B: SlotBackend>(held: Held<B>, made: bool) {
    drop(keep_or_give_back(held, made));
}

/// A create's slots with no task report to hold them by: kept under its external id or its
/// lease when the create may have made a task ([`keep_unknown`]), else given back.
fn keep_or_give_back<B: SlotBackend>(held: Held<B>, made: bool) -> B::Apply {
    let Held {
        reservation,
        backend,
        lease,
        external,
        path,
        ..
    } = held;
    if made {
        keep_unknown(&**backend, reservation, external.as_ref(), lease, path)
    } else {
        backend.apply_unread(SlotOp::GiveBack(reservation))
    }
}

/// Settles a create's slots from its result: starts the backend change and returns its future.
/// The result is changed in place (to an error when the answer cannot be read; markers added),
/// not moved. Should reading the result panic, the slots are kept or given back, not lost
/// ([`Settling`]).
fn settle_create<B: SlotBackend>(
    result: &mut Result<Response<Full<Bytes>>, BoxError>,
    held: &mut Option<Held<B>>,
) -> B::Apply {
    let waited = held.as_ref().expect("held is taken once").waited;
    let mut settling = Settling { held, made: true };
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            // Never sent, a limiter's refusal, a proxy's 4xx page: no task.
            let made = kling_core::error::may_have_created(&**error);
            return keep_or_give_back(settling.take(), made);
        }
    };
    // One lookup (and a reference count) when `ClassifyLayer` or another layer attached it.
    let outcome = match Outcome::ensure(response) {
        Ok(outcome) => outcome,
        Err(malformed) => {
            // An answer nobody can read: the create may have happened, unless something
            // refused it with a 4xx page (the same rule as for the classify step's error).
            let made = kling_core::error::may_have_created(&malformed);
            *result = Err(Box::new(malformed));
            return keep_or_give_back(settling.take(), made);
        }
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
    if outcome.is_success() {
        let Held {
            reservation,
            backend,
            lease,
            external,
            path,
            ..
        } = settling.take();
        return match outcome.task() {
            Some(task) if task.status.is_terminal() => {
                backend.apply_unread(SlotOp::GiveBack(reservation))
            }
            // Kept under the ids borrowed from the answer (the backend copies them inline);
            // the external id the answer reports (never empty: kling-core reads an echoed `""`
            // as none, which kept would make every such task "the same create"), else the
            // create's own.
            Some(task) => backend.hold_unread_on(
                reservation,
                Some(&task.id),
                task.external_id
                    .as_deref()
                    .or_else(|| external.as_ref().map(SmallId::as_str)),
                lease,
                // The lease counts from the answer's arrival (no clock read here).
                Some(outcome.received_at()),
                path,
            ),
            None => keep_unknown(&**backend, reservation, external.as_ref(), lease, path),
        };
    }
    let gated = code == Code::ParallelTaskLimit;
    if !gated && !code.halts_creates() && outcome.may_have_created() {
        // The task may run: under its external id (a lookup or a resend with it frees the
        // slot), else under the lease alone, as for a create whose answer was lost.
        return keep_or_give_back(settling.take(), true);
    }
    // The answer says no task was made: from here, an unwind gives the slots back.
    settling.made = false;
    let halt = (!gated && code.halts_creates()).then(|| ApiError::from_outcome(&outcome));
    if gated {
        response.extensions_mut().insert(SlotGated);
    }
    let Held {
        reservation,
        backend,
        ..
    } = settling.take();
    let op = match halt {
        _ if gated => SlotOp::Congested(reservation),
        Some(cause) => SlotOp::Halt { reservation, cause },
        None => SlotOp::GiveBack(reservation),
    };
    backend.apply_unread(op)
}

/// Whether the answer to a legacy single-task query (`{create path}/{id}`), naming one task
/// ended, is a list page: its `data` an array where a query's is the task itself (a server
/// that reads the path another way, `{create path}/x//..` with its slashes merged, answers its
/// create path's list). Such a page names tasks long ended, whose end no create's answer
/// waits for. A path every server reads as written ([`read_alike`]) is answered as the query
/// it is, whatever its shape. The shape, recorded when the answer was read, is asked first:
/// it costs a field's load, the path's check a pass over it.
#[inline]
fn answered_as_list(path: ReportPath<'_>, outcome: &Outcome) -> bool {
    let ReportPath::LegacyQuery(asked) = path else {
        return false;
    };
    matches!(outcome.tasks(), [task] if task.status.is_terminal())
        && outcome.lists_every_task()
        && !read_alike(asked)
}

/// Whether every server reads `path` as written: no escape (`%`), no `;` parameters, and no
/// empty (`//`, a trailing `/`) or dot segment, each of which a server may read otherwise than
/// this layer's router (kling-core's `Route::of`) does. The usual path (no `%`, `;` or `.`)
/// is told by a SIMD search; one with any of them is walked segment by segment.
fn read_alike(path: &str) -> bool {
    let odd = |segment: &[u8]| matches!(segment, b"" | b"." | b"..");
    let bytes = path.as_bytes();
    if memchr::memchr3(b'%', b';', b'.', bytes).is_none() {
        return !bytes.is_empty()
            && !bytes.ends_with(b"/")
            && !memchr::memchr_iter(b'/', bytes).any(|at| bytes.get(at + 1) == Some(&b'/'));
    }
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        match byte {
            b'%' | b';' => return false,
            // The segment before the leading `/` is no segment.
            b'/' if i > 0 && odd(&bytes[start..i]) => return false,
            b'/' => start = i + 1,
            _ => {}
        }
    }
    !odd(&bytes[start..])
}

/// The external ids a query asked about that its answer says do not exist, as updates that
/// end what is held under them (`None` when the query was no lookup by external id or the answer
/// does not say).
///
/// A lookup by external id is legacy `GET {create path}/{id}` (the id may be a task id or an
/// external id: only a holding under that external id is ended, and only one whose task id is
/// unknown, [`SlotOp::Update`]) or new-style
/// `GET /tasks?external_task_ids=…`. "Absent" is `1203` (not found), or a successful new-style
/// answer whose `data` is a list read in whole ([`Outcome::lists_every_task`], `[]` included)
/// that does not name it, each task listed carrying one of the external ids asked for (a list
/// with any other task is a server that ignored the filter: it says nothing of ours). It is the
/// rule the retry layer above sends a create again by: a `data` the answer could not read
/// (`null`, missing, an element without id or status) ends nothing, as the task may exist.
fn absent(asked: &PathAndQuery, outcome: &Outcome) -> Option<Vec<TaskUpdate>> {
    // Cheap tests first: this runs on every query's answer (the URI is parsed only for a
    // lookup by external id).
    let by_external = asked
        .query()
        .is_some_and(|q| q.contains("external_task_ids="));
    let not_found = outcome.code() == Code::NotFound;
    if !(not_found || (by_external && outcome.is_success())) {
        return None;
    }
    let recognized = Recognized::from_parts(&Method::GET, &Uri::from(asked.clone()), b"");
    let asked = if by_external {
        recognized.external_ids
    } else if recognized.generation == Some(ApiGeneration::Legacy) {
        // A single-task legacy query names one id in its path (`not_found` holds here).
        recognized.task_ids
    } else {
        return None;
    };
    if !not_found {
        let honours_filter = outcome.tasks().iter().all(|t| {
            t.external_id
                .as_ref()
                .is_some_and(|ext| asked.iter().any(|a| a == ext))
        });
        if !(honours_filter && outcome.lists_every_task()) {
            return None;
        }
    }
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
            // The in-process backend settles at once: each arm answers without a trip through
            // `Settle` (and without moving the response more than once).
            match this.state.as_mut().project() {
                StateProj::Create { future, held } => {
                    let mut output = ready!(future.poll(cx)).map_err(Into::into);
                    let apply = settle_create(&mut output, held);
                    match settle_now(apply, cx) {
                        None => {
                            this.state.set(State::Done);
                            return Poll::Ready(output);
                        }
                        Some(apply) => this.state.set(State::Settle {
                            apply,
                            output: Some(output),
                        }),
                    }
                }
                StateProj::Observe {
                    future,
                    backend,
                    lease,
                    asked,
                    account,
                    path,
                    list,
                } => {
                    let mut response = match ready!(future.poll(cx)) {
                        Ok(response) => response,
                        Err(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    };
                    let Ok(outcome) = Outcome::ensure(&mut response) else {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    };
                    let lease = *lease;
                    // Where the tasks it reports were created, as far as the request says: a
                    // task is found by external id among that path's creates only. (Read only
                    // for a task not found by its task id, or an answer that denies one.)
                    let (asked, known) = (&*asked, *path);
                    let path = match asked {
                        _ if known != CreatePath::UNKNOWN => ReportPath::Known(known),
                        Some(asked) => ReportPath::LegacyQuery(asked.path()),
                        None => ReportPath::Known(CreatePath::UNKNOWN),
                    };
                    let apply = if let Some(mut updates) =
                        asked.as_ref().and_then(|asked| absent(asked, &outcome))
                    {
                        // The server says these external ids name no task: the creates held
                        // under them never happened, and their slots go back now (the create
                        // sent again waits for slots like any other). The tasks the answer does
                        // report are handled as always, in the same change.
                        updates.extend(outcome.tasks().iter().map(TaskUpdate::from_report));
                        let account = account.clone();
                        let update = SlotOp::Update {
                            account,
                            updates,
                            lease,
                        };
                        backend.apply_unread_on(update, path.create_path())
                    } else if outcome.tasks().is_empty() {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    } else if *list || answered_as_list(path, &outcome) {
                        backend.observe_list_on(account, &outcome, lease, path.create_path())
                    } else {
                        backend.observe_unread_of(account, &outcome, lease, path)
                    };
                    drop(outcome);
                    match settle_now(apply, cx) {
                        None => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(response));
                        }
                        Some(apply) => this.state.set(State::Settle {
                            apply,
                            output: Some(Ok(response)),
                        }),
                    }
                }
                StateProj::Pass { future } => {
                    let output = ready!(future.poll(cx)).map_err(Into::into);
                    this.state.set(State::Done);
                    return Poll::Ready(output);
                }
                StateProj::Waiting { waiting, held } => {
                    if held.is_none() {
                        match ready!(waiting.poll_granted(cx, held)) {
                            Ok(()) => {}
                            Err(error) => {
                                // Dropping the acquire future leaves the queue.
                                this.state.set(State::Done);
                                return Poll::Ready(Err(error));
                            }
                        }
                    }
                    // Granted: the inner service is readied only now, then called.
                    match ready!(waiting.poll_send(cx)) {
                        Ok(future) => {
                            let held = held.take();
                            this.state.set(State::Create { future, held });
                        }
                        Err(error) => {
                            // Not sent: the slots go back.
                            if let Some(held) = held.take() {
                                let give_back = SlotOp::GiveBack(held.reservation);
                                drop(held.backend.apply_unread(give_back));
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                    }
                    continue;
                }
                StateProj::Settle { apply, output } => {
                    if let Err(error) = ready!(Pin::new(apply).poll(cx)) {
                        warn_unsettled(&error);
                    }
                    let output = output.take().expect("output is taken once");
                    this.state.set(State::Done);
                    return Poll::Ready(output);
                }
                StateProj::Failed { error } => {
                    let error = error.take().expect("error is taken once");
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// Polls a backend change once: `None` when it finished (its result only logged), else the
/// change to wait for.
#[inline(always)]
fn settle_now<A>(mut apply: A, cx: &mut Context<'_>) -> Option<A>
where
    A: Future<Output = Result<Applied, BackendError>> + Unpin,
{
    match Pin::new(&mut apply).poll(cx) {
        Poll::Ready(Ok(applied)) => {
            drop(applied.released);
            None
        }
        Poll::Ready(Err(error)) => {
            warn_unsettled(&error);
            None
        }
        Poll::Pending => Some(apply),
    }
}

#[cold]
fn warn_unsettled(error: &crate::error::BackendError) {
    // The response is real; losing it over bookkeeping would make callers repeat a create that
    // happened. Leases bound the damage.
    tracing::warn!(%error, "task slot state not updated");
}

#[cfg(test)]
mod tests {
    use super::read_alike;

    #[test]
    fn a_path_is_read_alike_only_without_escapes_parameters_or_odd_segments() {
        for path in [
            "/v1/videos/text2video/abc",
            "/proxy/v1/images/generations/t-1.x",
        ] {
            assert!(read_alike(path), "{path}");
        }
        for path in [
            "/v1/images/generations/old-image//..",
            "/v1/videos/text2video/abc/",
            "/v1/videos/./text2video/abc",
            "/v1/videos/text2video/..",
            "/v1/videos/text2video/%61bc",
            "/v1/videos;v=1/text2video/abc",
            "//v1/videos/text2video/abc",
            "",
        ] {
            assert!(!read_alike(path), "{path}");
        }
    }
}
