//! Where slot state lives: the [`SlotBackend`] trait and the in-process [`InProcess`] backend.
//!
//! The trait is shaped for a remote store from the start (a Redis backend implements it
//! unchanged): acquiring may wait and is cancelled by dropping its future; every change is one
//! [`SlotOp`] (one script on a remote store) whose result says which tasks it released; a task's
//! slots are released by task id exactly once (whichever of query, callback, `complete` or lease
//! comes first); a running task's lease is renewed whenever it is reported running; a waiting
//! acquire is woken when slots free; and every operation can fail with
//! [`BackendError`] when the store is unreachable.

mod memory;
mod path;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use kling_core::error::ApiError;
use kling_core::{AccountId, Outcome, Pool, TaskReport, TaskStatus};

use crate::error::{AcquireError, BackendError};

pub use memory::{InProcess, InProcessAcquire};

/// The unit slots are counted in: one pool of one account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// The account.
    pub account: AccountId,
    /// The pool.
    pub pool: Pool,
}

impl SlotKey {
    /// The key of `pool` in `account`.
    pub fn new(account: AccountId, pool: Pool) -> Self {
        SlotKey { account, pool }
    }
}

/// Slots granted to one create and not yet kept under a task or given back.
///
/// Plain data, not a guard: the layer hands it back to the backend in exactly one [`SlotOp`]
/// (`GiveBack`, `Hold`, `Congested` or `Halt`), also when its future is dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Where the slots were taken.
    pub key: SlotKey,
    /// How many.
    pub weight: u32,
    /// The backend's id of this grant (unique per backend), e.g. to expire an abandoned grant
    /// on a remote store.
    pub token: u64,
}

/// The ids a task's slots are kept under.
///
/// With an `id`, a query or callback reporting the task ends it; with only an `external_id`
/// (the create's outcome is unknown) a report of the same account carrying that external id
/// does (see [`SlotOp::Update`] for which), and the holding is then known by the task id too;
/// with neither, only the lease ends it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskRef {
    /// The server's task id (an empty one is none).
    pub id: Option<String>,
    /// The caller's `external_task_id` / `external_id` (an empty one is none: answers may
    /// echo `""` for a create that named no external id).
    pub external_id: Option<String>,
}

/// Where a task's external id is unique, as far as a request says: its legacy create path (a
/// legacy task is looked up at `{create path}/{external id}`), all new-style tasks together
/// (looked up with `GET /tasks?external_task_ids=`), or unknown (a callback, `complete`, a
/// [`SlotOp`] built by a caller). External ids may be unique per create path only (the mock's
/// rule), so one account may run a video and an image under one.
///
/// Kept as a hash of the path (no allocation): two paths may share one by chance (about one in
/// 2^64), and are then read as one. A holding and a report of two known scopes that differ are
/// two tasks; an unknown one may be either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CreatePath(u64);

impl CreatePath {
    /// Not known: matches any.
    pub const UNKNOWN: CreatePath = CreatePath(0);
    /// Every new-style create (`POST /text-to-video/kling-3.0`, …): their external ids are
    /// looked up together.
    pub const NEW_STYLE: CreatePath = CreatePath(1);

    /// A legacy create path (`/v1/videos/text2video`, with any prefix its requests carry; a
    /// trailing `/` is ignored).
    ///
    /// The path is read as kling-core reads it ([`Route::of`](kling_core::Route::of)), so one
    /// create path written another way a server routes alike is the same: `;` parameters
    /// removed (`text2video;jsessionid=1`), empty and dot segments removed (`videos//text2video`,
    /// `x/../text2video`), escapes of unreserved characters decoded, and a `%2F` a `/` where
    /// that reading is the create (`videos%2Ftext2video`). A plain path (none of these) is
    /// hashed as written, as before.
    pub fn legacy(create_path: &str) -> Self {
        path::remembered(create_path, |create_path| {
            let path = create_path.trim_end_matches('/');
            if !path::is_plain(path.as_bytes()) {
                return CreatePath::hashed(&path::normalized(path));
            }
            CreatePath::hashed(path)
        })
    }

    /// The path's hash, past the numbers taken.
    fn hashed(path: &str) -> Self {
        // (0 and 1 are taken.)
        CreatePath(memory::path_hash(path.as_bytes()).max(2))
    }

    /// The create path of a legacy single-task query (`{create path}/{id}`), read as
    /// [`CreatePath::legacy`] reads one: a query whose path kling-core reads otherwise than
    /// as written (`text2video;x/{id}`, `{id}/;x`, `text2video//{id}`) is of the create path
    /// before the task id kling-core finds in it, and one it reads as no legacy query is of
    /// an unknown path.
    pub fn of_legacy_query(query_path: &str) -> Self {
        let path = query_path.trim_end_matches('/');
        // A byte search from the end: the id after the last `/` is short, and `rsplit_once`'s
        // `memrchr` cost more than the hash on every query answer (184 instructions a query by
        // callgrind, against some 60 here). The plain check reads the path eight bytes at a
        // time (some 40 instructions a word: 250 a query of a 40-byte path, by callgrind).
        let Some(slash) = path.bytes().rposition(|byte| byte == b'/') else {
            return CreatePath::UNKNOWN;
        };
        // Read as written when the whole path is plain: the create path before the id is
        // then plain, ends in no `/` (`//` before the id), and the id is neither a dot
        // segment nor parameters (`;x`), nor holds a `%2F` read as a `/`.
        if path::is_plain(path.as_bytes()) {
            return CreatePath::hashed(&path[..slash]);
        }
        path::query_create_path(path).map_or(CreatePath::UNKNOWN, CreatePath::legacy)
    }

    /// The path's number (0: not known, 1: every new-style create, else the hash of a legacy
    /// create path): what a shared store (kling-redis) keeps with a holding. The processes of
    /// one fleet must number alike, so the hash is part of a release's behaviour.
    pub fn number(self) -> u64 {
        self.0
    }

    /// Whether a holding of scope `self` may be a task a report of scope `other` names.
    pub fn may_be(self, other: CreatePath) -> bool {
        self == other || self == CreatePath::UNKNOWN || other == CreatePath::UNKNOWN
    }
}

/// The create path of the tasks an answer reports, read only when a report needs it
/// ([`SlotBackend::observe_unread_of`]): a backend needs it to find a task by its external id,
/// not by its task id (the usual query's task), and reading a legacy query's path costs more
/// than the rest of the query's bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportPath<'a> {
    /// Known already: every new-style create, a legacy list's path, or not known.
    Known(CreatePath),
    /// The path of a legacy single-task query (`{create path}/{id}`): its tasks are of
    /// [`CreatePath::of_legacy_query`] of it.
    LegacyQuery(&'a str),
}

impl ReportPath<'_> {
    /// The create path.
    pub fn create_path(self) -> CreatePath {
        match self {
            ReportPath::Known(path) => path,
            ReportPath::LegacyQuery(query_path) => CreatePath::of_legacy_query(query_path),
        }
    }
}

/// What a query, list, callback or [`complete`](crate::SlotsHandle::complete) says of a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskUpdate {
    /// The task id (or, for `complete`, possibly an external id).
    pub id: String,
    /// The caller's external id, when reported.
    pub external_id: Option<String>,
    /// The reported status; `None` when the caller only said the task ended.
    pub status: Option<TaskStatus>,
}

impl TaskUpdate {
    /// The update a task report carries (a report's external id is never empty: kling-core
    /// reads an echoed `""` as none).
    pub fn from_report(report: &TaskReport) -> Self {
        TaskUpdate {
            id: report.id.clone(),
            external_id: report.external_id.clone(),
            status: Some(report.status.clone()),
        }
    }

    /// Whether the update says the task has ended.
    pub fn is_terminal(&self) -> bool {
        self.status.as_ref().is_none_or(TaskStatus::is_terminal)
    }
}

/// One change of slot state. Adding a variant is a breaking change on purpose: every backend
/// must handle every change.
#[derive(Clone, Debug)]
pub enum SlotOp {
    /// The create surely did not happen (or failed): free its slots now.
    GiveBack(Reservation),
    /// The create happened or may have: keep its slots under `task` with a lease.
    ///
    /// A holding already under the same task id, or under the same external id in the same
    /// account and pool (and create path, where known: [`SlotBackend::hold_unread_on`]) with
    /// no task id known (a create of unknown outcome), is this create's earlier attempt: it
    /// gives its slots back. One under the external id whose task id is known is another task
    /// (the external id reused), and so is one in another pool or on another path (external
    /// ids may be unique per create path only): they keep their slots. Except a task a
    /// reconcile adopted ([`SlotOp::Adopt`]) in the same pool, when this create's task id is
    /// unknown (its answer lost after the list named the task): the same task, whose id the
    /// create's holding takes, and whose adopted holding gives its slots back.
    Hold {
        /// The granted slots.
        reservation: Reservation,
        /// The ids to keep them under.
        task: TaskRef,
        /// The lease (maximum task lifetime).
        lease: Duration,
    },
    /// The create met `1303`: free its slots and lower the pool's believed capacity.
    Congested(Reservation),
    /// The create met `1102` (or `1100`/`1101`): free its slots and refuse further creates of
    /// the account until [`SlotOp::ResetHalt`].
    Halt {
        /// The granted slots.
        reservation: Reservation,
        /// The server's refusal.
        cause: ApiError,
    },
    /// Tasks were reported: terminal ones are released (exactly once), running ones renew
    /// their lease to `lease` from now.
    ///
    /// A report finds its task by task id (the server's, unique everywhere), else by external
    /// id within `account` only: external ids are the caller's, unique per account, so one
    /// account's report never settles another account's holding under the same external id.
    /// By external id, a report that names a task id finds only a holding whose task id is
    /// unknown (a create of unknown outcome): one known by another task id is another task, of
    /// another create path (external ids may be unique per path only) or under a reused id.
    /// A report with an empty task id and no status (a lookup by external id that found no
    /// task) likewise ends only a holding whose task id is unknown: a task whose id an answer
    /// or report gave exists, whatever a lookup elsewhere says. `complete`'s text (no status),
    /// which may be an external id, finds any holding under it. Where two holdings of the
    /// account could be the one a report names by external id (creates on two paths), it
    /// names neither; a report of a known create path ([`SlotBackend::observe_unread_on`],
    /// [`SlotBackend::apply_unread_on`]) only looks among that path's creates.
    Update {
        /// The account the reports come from (the query's, or the callback's).
        account: AccountId,
        /// The reports.
        updates: Vec<TaskUpdate>,
        /// The lease to renew running tasks to.
        lease: Duration,
    },
    /// A response was seen: the tasks it reports are handled as in [`SlotOp::Update`] (the
    /// response's parsed [`Outcome`] is shared, so nothing is copied on the way).
    Observed {
        /// The account of the request the response answers.
        account: AccountId,
        /// The response's outcome.
        outcome: Outcome,
        /// The lease to renew running tasks to.
        lease: Duration,
    },
    /// A task found on the server (reconcile): keep `weight` slots of `key` under it unless
    /// it is already known (held, or remembered as reported ended: see
    /// [`SlotBackend::begin_listing`]). By its external id, only a holding of `key`'s product
    /// whose task id is unknown (or an end not told with another task id) may be it (a create
    /// of another product is another create path's, whose external ids may be the same), and
    /// of the list's create path where both are known ([`SlotBackend::adopt_on`]); such a
    /// holding learns the task id, as from a report of the task running. A task listed
    /// without its external id cannot be told from such a holding; [`InProcess`] joins the
    /// two (of one product and path) at the first report naming the task by both ids (the
    /// create's holding takes the task id, the adopted one gives its slots back).
    Adopt {
        /// Where it counts.
        key: SlotKey,
        /// Its ids.
        task: TaskRef,
        /// Its weight.
        weight: u32,
        /// Its lease.
        lease: Duration,
    },
    /// Sets a pool's capacity at run time, for one account or (`None`) for all. Creates
    /// waiting in such a pool that need more slots than its new capacity (above 0) fail with
    /// [`AcquireError::OverCapacity`] at once; those behind them are served as slots allow.
    SetCapacity {
        /// The account, or every account.
        account: Option<AccountId>,
        /// The pool.
        pool: Pool,
        /// The new capacity (0 holds every create of the pool).
        capacity: u32,
    },
    /// Lifts a halt.
    ResetHalt(AccountId),
}

/// Why a task's slots were released.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReleaseReason {
    /// A query, list or callback reported this terminal status.
    Ended(TaskStatus),
    /// The caller said the task ended ([`SlotsHandle::complete`](crate::SlotsHandle::complete)).
    Completed,
    /// Nothing reported the task ended before its lease ran out.
    LeaseExpired,
}

impl ReleaseReason {
    /// The `status` label of the finished-task metrics.
    pub fn as_str(&self) -> &str {
        match self {
            ReleaseReason::Ended(status) => status.as_str(),
            ReleaseReason::Completed => "completed",
            ReleaseReason::LeaseExpired => "expired",
        }
    }
}

/// One task whose slots were released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// Where the slots were.
    pub key: SlotKey,
    /// The task id (or external id) they were held under, if any.
    pub task: Option<std::sync::Arc<str>>,
    /// How many.
    pub weight: u32,
    /// How long they were held.
    pub held_for: Duration,
    /// Why they were released.
    pub reason: ReleaseReason,
}

/// What one [`SlotOp`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Tasks whose slots it released (each one exactly once over the backend's life).
    pub released: Vec<Released>,
    /// Whether it changed anything (an adopt of an unknown task, a halt that was on, a
    /// capacity that differed).
    pub changed: bool,
}

/// The state of one pool, as [`SlotBackend::snapshot`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSnapshot {
    /// The pool and its account.
    pub key: SlotKey,
    /// Slots held by running tasks and creates in progress.
    pub in_use: u32,
    /// Slots the pool is believed to have now (configured minus those hidden by `1303`).
    pub capacity: u32,
    /// Slots configured.
    pub configured: u32,
    /// Creates waiting.
    pub waiters: usize,
    /// Tasks holding slots.
    pub tasks: usize,
}

/// Where slot state lives. See the [module docs](self).
///
/// # Contract
///
/// - [`acquire`](SlotBackend::acquire) grants in first-come-first-served order per
///   [`SlotKey`]; dropping the future before it completes holds nothing (a grant it already
///   received is given back); it fails with [`AcquireError::Halted`] while the account is halted.
/// - [`apply`](SlotBackend::apply) starts the change when called: it takes effect even when
///   the returned future is dropped unpolled (a remote backend sends or spawns the command
///   before returning); the future only reports the result. Layers call it from `Drop`.
/// - A task's slots are released exactly once, and a release wakes waiters of its pool.
/// - A [`Reservation`] is handed to the backend in exactly one change, and never again: should
///   the method that takes it panic, the layer does not repeat the change (repeated after it
///   took effect, it would free or hold the slots twice). A backend keeps its state whole
///   across anything in a change that may unwind (a metrics recorder, a log), and a grant it
///   counts in use is returned to the caller or kept where dropping the acquire future finds
///   it ([`InProcess`] records its metrics once its lock is released, and gives back a grant
///   whose hand-over a recorder's panic went through). A reservation handed back that no grant
///   holds (a stale copy, settled already; another pool's, account's or backend's; made up)
///   frees no slot: [`InProcess`] ignores its give-back or `1303` and logs it, applies its
///   halt without freeing slots, and counts the slots of a hold of it anew.
/// - External ids are unique per account only: a holding is found by its external id only by
///   a change of its own account ([`SlotOp::Update`], [`SlotOp::Observed`], [`SlotOp::Adopt`],
///   and the supersede rule of [`SlotOp::Hold`]); and perhaps per create path only: a report
///   that names a task id never finds a holding known by another task id by external id, nor
///   (see [`CreatePath`]) one of another create path, and one that could name two holdings
///   names neither.
/// - A create waiting for slots whose weight is above its pool's configured capacity, once a
///   [`SlotOp::SetCapacity`] lowered it, fails with [`AcquireError::OverCapacity`] rather than
///   block the pool's queue.
pub trait SlotBackend: Clone + Send + Sync + 'static {
    /// The future of [`acquire`](SlotBackend::acquire).
    type Acquire: Future<Output = Result<Reservation, AcquireError>> + Send + Unpin + 'static;
    /// The future of [`apply`](SlotBackend::apply).
    type Apply: Future<Output = Result<Applied, BackendError>> + Send + Unpin + 'static;
    /// The future of [`snapshot`](SlotBackend::snapshot).
    type Snapshot: Future<Output = Result<Vec<PoolSnapshot>, BackendError>> + Send + Unpin + 'static;

    /// Waits (FIFO, cancellable by drop) for `weight` slots of `key`.
    fn acquire(&self, key: SlotKey, weight: u32) -> Self::Acquire;

    /// [`acquire`](SlotBackend::acquire) polled once, without a waker: `Ok` with its result
    /// when that first poll is ready, else `Err` with the future, which keeps its place in the
    /// queue and must be polled again with a real waker. A backend may grant without building
    /// the future (the layer's create path: no `Arc` clone per create). By default, exactly
    /// that first poll.
    fn acquire_now(
        &self,
        key: SlotKey,
        weight: u32,
    ) -> Result<Result<Reservation, AcquireError>, Self::Acquire> {
        let mut acquire = self.acquire(key, weight);
        match Pin::new(&mut acquire).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(result) => Ok(result),
            Poll::Pending => Err(acquire),
        }
    }

    /// Applies one change.
    fn apply(&self, op: SlotOp) -> Self::Apply;

    /// Applies one change whose [`Applied`] the caller drops unread (the layer's bookkeeping
    /// after each response): the change, its metrics and its errors are those of
    /// [`apply`](SlotBackend::apply), but the backend may leave [`Applied::released`] empty
    /// rather than build it. By default, `apply`.
    fn apply_unread(&self, op: SlotOp) -> Self::Apply {
        self.apply(op)
    }

    /// Keeps a granted create's slots under the ids its answer (or the create itself) gave,
    /// the result dropped unread: [`apply_unread`](SlotBackend::apply_unread) of
    /// [`SlotOp::Hold`], with the ids borrowed so that a backend may keep them without copying
    /// them into `String`s first (the layer's create path). `answered_at`: when the answer
    /// arrived ([`Outcome::received_at`]), if there was one: a backend on this process's clock
    /// may start the lease there instead of reading the clock. By default, that `Hold` with the
    /// ids copied into its [`TaskRef`] (`answered_at` unused).
    fn hold_unread(
        &self,
        reservation: Reservation,
        id: Option<&str>,
        external_id: Option<&str>,
        lease: Duration,
        answered_at: Option<Instant>,
    ) -> Self::Apply {
        let _ = answered_at;
        self.apply_unread(SlotOp::Hold {
            reservation,
            task: TaskRef {
                id: id.map(str::to_owned),
                external_id: external_id.map(str::to_owned),
            },
            lease,
        })
    }

    /// [`hold_unread`](SlotBackend::hold_unread) of a create sent to `path`: a backend may
    /// keep the path, so that a report of another create path's task under the same external id
    /// does not end this one ([`CreatePath`]). By default, `hold_unread` (the path unused).
    fn hold_unread_on(
        &self,
        reservation: Reservation,
        id: Option<&str>,
        external_id: Option<&str>,
        lease: Duration,
        answered_at: Option<Instant>,
        path: CreatePath,
    ) -> Self::Apply {
        let _ = path;
        self.hold_unread(reservation, id, external_id, lease, answered_at)
    }

    /// [`observe_unread`](SlotBackend::observe_unread) of the answer to a request whose tasks
    /// were created on `path`: a backend may find a task by its external id among holdings of
    /// that path only ([`CreatePath`]). By default, `observe_unread` (the path unused).
    fn observe_unread_on(
        &self,
        account: &AccountId,
        outcome: &Outcome,
        lease: Duration,
        path: CreatePath,
    ) -> Self::Apply {
        let _ = path;
        self.observe_unread(account, outcome, lease)
    }

    /// [`observe_unread_on`](SlotBackend::observe_unread_on) with the path read only if a
    /// report needs it ([`ReportPath::create_path`]): a backend that finds the reported task by
    /// its task id may skip reading it (the layer's query path). By default, `observe_unread_on`
    /// with the path read first.
    fn observe_unread_of(
        &self,
        account: &AccountId,
        outcome: &Outcome,
        lease: Duration,
        path: ReportPath<'_>,
    ) -> Self::Apply {
        self.observe_unread_on(account, outcome, lease, path.create_path())
    }

    /// [`observe_unread_on`](SlotBackend::observe_unread_on) of a page of a list (one sent
    /// through the layer, or a [`reconcile`](crate::SlotsHandle::reconcile)'s): the end of a
    /// task it names that nothing here holds is not remembered as an end that overtook its
    /// create's answer, however few tasks the page names. A list names tasks long ended (a
    /// legacy list keeps them for days), often one alone on its last page; remembered, such an
    /// end would free a later create of unknown outcome under the same external id (another
    /// path's create may carry it). By default `observe_unread_on`.
    fn observe_list_on(
        &self,
        account: &AccountId,
        outcome: &Outcome,
        lease: Duration,
        path: CreatePath,
    ) -> Self::Apply {
        self.observe_unread_on(account, outcome, lease, path)
    }

    /// [`apply_unread`](SlotBackend::apply_unread) of a [`SlotOp::Update`] whose reports are
    /// of tasks created on `path` (a lookup by external id at `{create path}/{external id}`
    /// that found nothing): a backend may find them by external id among holdings of that path
    /// only ([`CreatePath`]). By default, `apply_unread` (the path unused).
    fn apply_unread_on(&self, op: SlotOp, path: CreatePath) -> Self::Apply {
        let _ = path;
        self.apply_unread(op)
    }

    /// [`apply`](SlotBackend::apply) of a [`SlotOp::Adopt`] of a task a reconcile listed on
    /// `path` (a legacy list's create path, or [`CreatePath::NEW_STYLE`]): a backend may take
    /// it, by its external id, for a holding of that path only, and keep the path with it, so
    /// that a create or report of another path under the same external id is not that task.
    /// By default, `apply` (the path unused).
    fn adopt_on(&self, op: SlotOp, path: CreatePath) -> Self::Apply {
        let _ = path;
        self.apply(op)
    }

    /// Handles the tasks a response to a request of `account` reports, the result dropped
    /// unread: [`apply_unread`](SlotBackend::apply_unread) of [`SlotOp::Observed`], with the
    /// outcome borrowed so that a backend may read it in place (the layer's query path; a
    /// backend on this process's clock may renew leases from [`Outcome::received_at`] instead
    /// of reading the clock). By default, that `Observed` with the account and the outcome
    /// cloned (reference counts).
    fn observe_unread(
        &self,
        account: &AccountId,
        outcome: &Outcome,
        lease: Duration,
    ) -> Self::Apply {
        self.apply_unread(SlotOp::Observed {
            account: account.clone(),
            outcome: outcome.clone(),
            lease,
        })
    }

    /// Every known pool's state (expired leases released first).
    fn snapshot(&self) -> Self::Snapshot;

    /// The halts this backend applies ([`SlotOp::Halt`]), counted as each is in place, and
    /// which accounts are halted now: the layer stamps each create it grants with it
    /// ([`HaltGate`](kling_core::signals::HaltGate)), and the classify step refuses, unsent, a
    /// create whose account was halted after its grant (while it waited below the slots, in a
    /// rate limiter). By default `None`: no such check, a create granted before a halt is sent.
    fn create_halts(&self) -> Option<std::sync::Arc<kling_core::signals::CreateHalts>> {
        None
    }

    /// A reconcile ([`SlotsHandle::reconcile`](crate::SlotsHandle::reconcile)) begins listing
    /// the server's tasks: until the matching [`end_listing`](SlotBackend::end_listing), a task
    /// whose holding a report (query, list, callback, `complete`) ends is remembered as ended
    /// (bounded, as the ends that overtake a create's answer are), so that a
    /// [`SlotOp::Adopt`] of it, from a list the server answered before that end, holds
    /// nothing. Listings may overlap. By default nothing: a backend that remembers every end
    /// that frees a holding anyway needs no listing ([`InProcess`] and kling-redis do, so that
    /// an end reported before the reconcile began is not adopted either, from a list that runs
    /// behind); one that does neither adopts such a task and holds it until its lease runs out.
    /// A reconcile adopts each page's tasks as soon as the page is answered: the ends an adopt
    /// must find are those since its page was asked for, and those a list running behind still
    /// misses.
    fn begin_listing(&self) {}

    /// Ends one [`begin_listing`](SlotBackend::begin_listing) (called once for each, also when
    /// the reconcile fails or is dropped). By default nothing.
    fn end_listing(&self) {}
}
