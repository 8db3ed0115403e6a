//! [`SpendGuardLayer`]: a credit budget per period (a day), enforced before creates reach the
//! server.
//!
//! Each create is priced by a [`CostTable`] (per pool or product; an image create costs the
//! per-image price × `n`). When the estimate would pass what is left of the budget, the create
//! fails at once with [`BudgetExceeded`] and is never sent. An accepted estimate counts against
//! the budget straight away; it is given back when the server refuses the create (a code that
//! cannot have created a task, or a request that was never sent, or a create the caller
//! dropped while a layer below still held it back unsent: see below), and replaced by the real
//! cost when a query or callback reports the finished task's cost in credits
//! ([`TaskReport::cost_in_credits`]: the legacy `final_unit_deduction`, or the sum of
//! new-style `billing[].amount` when the items name no `currency` or one that
//! [reads as credits](kling_core::Currency::is_credits): `credit`, `credits`, `unit` or
//! `units`, in any case). A cost in another currency (`"USD"`), or in two, keeps the
//! estimate: booked as credits, 0.14 dollars would under-count the budget, and no exchange
//! rate is known here. A finished task reported without a cost (a callback body) keeps
//! awaiting one, from a later query, until the period ends. A create whose outcome is unknown
//! keeps its estimate: the task may run and be billed. The ledger counts whole nano-credits
//! (prices and costs rounded to the nearest), so sums and give-backs are exact.
//!
//! One task is charged once. A create answered with a task the ledger has charged already (a
//! resend Kling answered with the task it had made for the same `external_task_id`, a server's
//! echo) gives its estimate back: the task's first estimate, or its real cost once reported,
//! is what it costs. A create whose outcome was unknown is kept with no task id, but with its
//! external id when it has one: the caller's `external_task_id` / `external_id`, or the `kr-…`
//! id a retry layer below generated, which the guard reads from that layer's error
//! ([`Failed::external_id`](kling_retry::error::Failed::external_id)). The first task not
//! charged yet that a query or a callback reports with that id echoed (the lookup by external
//! id KLING_API.md asks for before creating again) is charged that create's estimate and
//! awaits its real cost as any other, which then replaces it (of several such creates with
//! that id, the smallest estimate: the task may be any one's, and the others keep theirs). A
//! create's answer does not match it: a resend answered with a task not charged yet is
//! charged its own estimate, as whether Kling answers a duplicate external id with the task
//! it made, refuses it or makes a second one is unconfirmed (in the last case both are
//! billed), so an unknown create resent without a lookup stays charged twice until its
//! period ends. Nor does a report that comes while a create with that external id is out
//! (a resend not answered yet): the task may be the resend's, which its answer charges; the
//! unknown create keeps its estimate for a later report. One not matched by its period's end
//! is forgotten with that period (its estimate stays charged there).
//!
//! The ledger knows the tasks still awaiting their cost, the last [`CHARGED_TASKS_KEPT`] of an
//! account's others (cost reported, or charged to a period that has ended) and the last
//! [`UNKNOWN_CREATES_KEPT`] of its creates kept with an unknown outcome and an external id. A
//! create answered with a task older than those is charged again, as is the task of an
//! unknown create older than those, of one that had no external id, or of one whose generated
//! id the guard never saw (dropped by its caller while a retry layer below had it out). Ids
//! are not kept for ever: memory stays bounded.
//!
//! Nor does an id's length count: an external id or a task id longer than 256 bytes
//! (KLING_API.md states no limit for either; a generated `kr-…` id is 35 bytes, and a server, a
//! proxy or the mock told to may answer with a task id of any length) is kept as its SHA-256
//! digest, in 51 bytes, and matched as exactly as the id itself (barring a SHA-256 collision).
//! A false match could give one create's estimate to another's task and leave that one
//! uncharged, or take a new task for one charged already; forgetting a long id would keep its
//! create's estimate where a lookup reports the cost, and charge a resend answered with that
//! task again.
//!
//! Nor are accounts kept for ever. An account with nothing left to remember is forgotten: no
//! create out, and its period over, or holding no charge, no task awaiting a cost and no create
//! of unknown outcome. It starts again as a new one would (its next create starts a period,
//! later than its own would have); the tasks it was charged for are forgotten with it (a create
//! answered with one is charged again): the guard errs towards counting more. The accounts are
//! swept when a new one would bring them to twice those kept at the last sweep (64 at least):
//! a gateway routing many accounts through one guard keeps about those of the current period.
//!
//! The refusal is read wherever it arrives: as a response (the guard over a bare client), or
//! as the error a retry layer below makes of it (the guard in [`KlingLayer`](crate::KlingLayer),
//! where every refusal is a `kling_retry` [`Failed`](kling_retry::error::Failed) or
//! [`DeadlineExceeded`](kling_retry::error::DeadlineExceeded)). Behind a retry layer the
//! estimate goes back when its last answer's code cannot have created a task (`1301`, `1303`,
//! `1101`, an undocumented code that came with a 4xx status, …; not `5000`/`5002` or another
//! undocumented code: [`Code::may_have_created_under`](kling_core::Code::may_have_created_under))
//! and the retry layer stopped for a reason
//! that leaves no create unresolved: the answer was final, its attempts or budget ran out, or
//! the deadline came, without an earlier attempt that may have made a task and that no lookup
//! by external id ruled out (`may_have_created()` on either error). Anything else — a create
//! that may have happened, an unresolved lookup, an unknown reason — keeps it. A create the
//! layers below refuse before sending it (a limiter's refusal, a signing failure: any error
//! that [`SendState::of`](kling_core::SendState::of) reads as never sent, which the stack's
//! refusals say through [`RefusedBeforeSending`](kling_core::error::RefusedBeforeSending))
//! gives it back too.
//!
//! Budgets are kept per [`AccountId`] (requests without one share a budget) and start again
//! every period, counted from an account's first create (its first since it was forgotten). A
//! new period starts from the creates still open (reserved, not yet answered or given back):
//! they are sent, if at all, in it.
//!
//! # Example
//!
//! ```
//! use kling_tower::spend::{CostTable, SpendGuardLayer};
//!
//! // The Free tier's 66 credits a day, a video at 10 credits, an image at 1 per picture.
//! let costs = CostTable::new().video(10.0).image_per_image(1.0);
//! let guard = SpendGuardLayer::new(66.0, costs)?;
//! assert_eq!(guard.remaining(None), 66.0);
//! # Ok::<(), kling_tower::error::ConfigError>(())
//! ```

pub mod future;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use kling_core::signals::SendWatch;
use kling_core::{AccountId, BoxError, PeekBody, Pool, Product, Recognized, TaskReport};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{BudgetExceeded, ConfigError};
use crate::preset::{MAX_DURATION, StackConfig};

/// What a create is estimated to cost, in credits (the unit of `final_unit_deduction`).
///
/// A pool's own price (`video:kling-3.0`) wins over its product's (a [`pool`](Self::pool)
/// entry for the product, `video`, else [`video`](Self::video)), as
/// [`StackConfig::slots_for`] finds a pool's slots; an image create costs its price × `n`.
/// The defaults are 1 credit per video, per image and per try-on, what `kling-mock` bills; set
/// your models' prices.
#[derive(Clone, Debug, PartialEq)]
pub struct CostTable {
    video: f64,
    image: f64,
    try_on: f64,
    pools: BTreeMap<String, f64>,
}

impl Default for CostTable {
    fn default() -> Self {
        CostTable::new()
    }
}

impl CostTable {
    /// 1 credit per video, per image and per try-on.
    pub fn new() -> Self {
        CostTable {
            video: 1.0,
            image: 1.0,
            try_on: 1.0,
            pools: BTreeMap::new(),
        }
    }

    /// The price of a video create.
    pub fn video(mut self, credits: f64) -> Self {
        self.video = credits;
        self
    }

    /// The price of one image (an image create costs this × `n`).
    pub fn image_per_image(mut self, credits: f64) -> Self {
        self.image = credits;
        self
    }

    /// The price of a try-on create.
    pub fn try_on(mut self, credits: f64) -> Self {
        self.try_on = credits;
        self
    }

    /// The price in one pool (`video:kling-3.0`, `image:kling-v2`: per image), or of every
    /// pool of a product without its own entry (`video`, as [`video`](Self::video) sets it).
    /// A name that is no pool (`vidoe`) is refused by [`SpendGuardLayer::new`] (`costs.vidoe`).
    pub fn pool(mut self, pool: impl Into<String>, credits: f64) -> Self {
        self.pools.insert(pool.into(), credits);
        self
    }

    /// The estimated cost of a recognised request (0 for anything but a create).
    pub fn estimate(&self, request: &Recognized) -> f64 {
        let Some(pool) = request.pool.as_ref().filter(|_| request.is_create()) else {
            return 0.0;
        };
        // The pool's own entry, else its product's (`video` for `video:kling-3.0`): a product
        // entry found only for legacy creates priced every new-style create at the default.
        let own = || self.pools.get(pool.to_string().as_str());
        let product = || {
            pool.model()
                .and_then(|_| self.pools.get(pool.product().as_str()))
        };
        let unit = (!self.pools.is_empty())
            .then(|| own().or_else(product))
            .flatten()
            .copied()
            .unwrap_or(match pool.product() {
                Product::Image => self.image,
                Product::TryOn => self.try_on,
                _ => self.video,
            });
        match pool.product() {
            Product::Image => unit * f64::from(request.weight.max(1)),
            _ => unit,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let ok = |c: f64| c.is_finite() && c >= 0.0;
        for (field, cost) in [
            ("costs.video", self.video),
            ("costs.image", self.image),
            ("costs.try_on", self.try_on),
        ] {
            if !ok(cost) {
                return Err(ConfigError::new(
                    field,
                    "must be a finite number, 0 or more",
                ));
            }
        }
        for (pool, cost) in &self.pools {
            // A name no create is ever priced by (a typo) would leave its creates at the
            // default price without a word.
            if Pool::parse(pool).is_none() {
                return Err(ConfigError::new(
                    format!("costs.{pool}"),
                    "is not a pool (video, image, try-on, or product:model)",
                ));
            }
            if !ok(*cost) {
                return Err(ConfigError::new(
                    format!("costs.{pool}"),
                    "must be a finite number, 0 or more",
                ));
            }
        }
        Ok(())
    }
}

/// How many of an account's tasks no longer awaiting a cost the ledger remembers, to know a
/// create answered with one of them as no new task (see the [module docs](self)).
pub const CHARGED_TASKS_KEPT: usize = 1024;

/// How many of an account's creates kept with an unknown outcome (a 5000, a timeout, a create
/// a retry layer left unresolved) the ledger remembers by their external id, to charge the
/// task one of them made once when it turns up (see the [module docs](self)).
pub const UNKNOWN_CREATES_KEPT: usize = 1024;

/// Slack for comparing credits given as floats: one nano-credit, the ledger's unit.
pub(crate) const EPSILON: f64 = 1e-9;

/// Credits as the ledger counts them: whole nano-credits. Sums and give-backs of integers are
/// exact; summed as floats, a hundred thousand 0.1-credit creates came to more than 10,000
/// credits and a budget of exactly that refused its last create.
pub(crate) type Nanos = u128;

/// A non-negative finite price or budget in nano-credits (rounded; saturating past `u128`).
fn to_nanos(credits: f64) -> Nanos {
    (credits / EPSILON).round() as Nanos
}

/// Nano-credits back in credits, for the caller's eyes.
fn to_credits(nanos: Nanos) -> f64 {
    nanos as f64 / 1e9
}

struct Account {
    period_start: Instant,
    committed: Nanos,
    /// Reservations neither given back nor turned into a task yet (creates still waiting below
    /// the guard, or sent and not answered): carried into the next period when one starts, as
    /// their tasks, if any, are made then.
    open: Nanos,
    /// Task id ([as kept](kept_id)) → the estimate it was charged, until its real cost is
    /// known.
    tasks: HashMap<String, Nanos>,
    /// Tasks charged and no longer in `tasks` (by task id, [as kept](kept_id)): a create
    /// answered with one made no new task.
    charged: ChargedTasks,
    /// Creates of this period kept with an unknown outcome, by external id: the task one made,
    /// when it turns up, is charged its estimate.
    unknown: UnknownCreates,
    /// The external ids of the creates reserved and not settled yet (a resend of an unknown
    /// create, out), with how many carry each: a task reported with one of them may be that
    /// create's, which its answer will charge, so it takes no unknown create's estimate.
    /// Bounded by the creates out; carried across periods, as they are.
    sending: IdCounts,
}

impl Account {
    /// A create with the caller's external id `id` ([as kept](kept_id)) is out.
    fn sending(&mut self, id: Option<&str>) {
        if let Some(id) = id {
            self.sending.add(id);
        }
    }

    /// A create with the caller's external id `id` ([as kept](kept_id)) is settled.
    fn settled(&mut self, id: Option<&str>) {
        if let Some(id) = id {
            self.sending.remove(id);
        }
    }
}

/// The longest external id or task id the ledger keeps as it is, in bytes. KLING_API.md
/// states no limit (a generated `kr-…` id is 35 bytes, a UUID 36): this one is generous, and
/// a longer id is kept as its digest ([`kept_id`]), so what an account's ledger holds no
/// longer grows with what its callers send or its server answers.
const ID_KEPT_BYTES: usize = 256;

/// What starts an id kept as its digest. An id the caller sends (or the server answers)
/// starting so is digested too, whatever its length: no id kept as it is can equal a digest.
const DIGESTED: &str = "\0sha256:";

/// An external id or a task id as the ledger keeps it: as it is, or, longer than
/// [`ID_KEPT_BYTES`] (or starting with [`DIGESTED`]), as [`DIGESTED`] and its SHA-256 digest
/// (51 bytes). Two ids are kept alike only when they are equal (barring a SHA-256 collision),
/// so matching stays exact: a report names an unknown create's task only with that create's
/// own id, and a task is charged once only by its own id. A false match could hand one
/// create's estimate to another's task and leave that one's task uncharged, or take a new task
/// for one charged already; a short or weak hash, or the id's first bytes, would allow one.
/// Not remembering a long id, as a create without one, would err towards counting more too,
/// but keep its estimate where a lookup reports the cost, and charge a resend answered with
/// that task again. External ids and task ids are kept apart: a task id never matches an
/// external id, kept alike or not.
///
/// Every id enters the ledger so: the caller's external id once, as its create is recognised
/// (a long one is hashed once a create), one a retry layer names as its create is settled, one
/// a report echoes as it is matched; a task id as its create's answer or a report names it.
pub(crate) fn kept_id(id: &str) -> Cow<'_, str> {
    if digested(id) {
        Cow::Owned(digest(id))
    } else {
        Cow::Borrowed(id)
    }
}

/// Whether the ledger keeps `id` as its digest ([`kept_id`]).
fn digested(id: &str) -> bool {
    id.len() > ID_KEPT_BYTES || id.starts_with(DIGESTED)
}

/// `id` kept as its digest ([`kept_id`]).
fn digest(id: &str) -> String {
    let mut kept = String::with_capacity(DIGESTED.len() + 43);
    kept.push_str(DIGESTED);
    URL_SAFE_NO_PAD.encode_string(Sha256::digest(id.as_bytes()), &mut kept);
    kept
}

/// A multiset of ids (external ids, [as kept](kept_id)): how many of the entries it counts
/// carry each id, an id dropped when none does.
#[derive(Debug, Default)]
struct IdCounts(HashMap<String, usize>);

impl IdCounts {
    fn add(&mut self, id: &str) {
        match self.0.get_mut(id) {
            Some(count) => *count += 1,
            None => {
                self.0.insert(id.to_owned(), 1);
            }
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(count) = self.0.get_mut(id) {
            *count -= 1;
            if *count == 0 {
                self.0.remove(id);
            }
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.0.contains_key(id)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn total(&self) -> usize {
        self.0.values().sum()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// The ids ([as kept](kept_id)) of the latest [`CHARGED_TASKS_KEPT`] tasks an account was
/// charged for and no longer awaits a cost of (cost reported, or charged to a period that has
/// ended), oldest forgotten first.
#[derive(Debug, Default)]
struct ChargedTasks {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl ChargedTasks {
    fn insert(&mut self, id: String) {
        if !self.ids.insert(id.clone()) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > CHARGED_TASKS_KEPT
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

/// The latest [`UNKNOWN_CREATES_KEPT`] creates of an account's period kept with an unknown
/// outcome and an external id, each with the estimate it kept, oldest forgotten first (its
/// estimate stays charged; the task it made, if any, is then charged again when it turns up).
/// Two such creates with one external id are two entries: each may have made a task.
#[derive(Debug, Default)]
struct UnknownCreates {
    /// External id ([as kept](kept_id)) and estimate, oldest first.
    order: VecDeque<(String, Nanos)>,
    /// External id → how many entries of `order` carry it: a report naming none of them is
    /// passed over without a search.
    counts: IdCounts,
}

impl UnknownCreates {
    /// Remembers a create; returns whether the oldest was forgotten to make room.
    fn insert(&mut self, id: String, estimate: Nanos) -> bool {
        self.counts.add(&id);
        self.order.push_back((id, estimate));
        if self.order.len() > UNKNOWN_CREATES_KEPT
            && let Some((oldest, _)) = self.order.pop_front()
        {
            self.counts.remove(&oldest);
            return true;
        }
        false
    }

    /// The smallest estimate of the creates remembered with external id `id` (the oldest of
    /// those), forgotten now. The task reported may be any one's: the larger estimates stay
    /// charged for the tasks the others may have made, so the account is never under-counted.
    fn take(&mut self, id: &str) -> Option<Nanos> {
        if !self.counts.contains(id) {
            return None;
        }
        let at = self
            .order
            .iter()
            .enumerate()
            .filter(|(_, (kept, _))| kept == id)
            .min_by_key(|(_, (_, estimate))| *estimate)
            .map(|(at, _)| at)?;
        let (id, estimate) = self.order.remove(at)?;
        self.counts.remove(&id);
        Some(estimate)
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn clear(&mut self) {
        self.order.clear();
        self.counts.clear();
    }
}

/// The fewest accounts a ledger holds before it sweeps: a stack's guard, with its one account,
/// never does.
const SWEEP_AT_LEAST: usize = 64;

/// The accounts of a ledger: those with something to remember, and those forgotten at the
/// next sweep.
struct Accounts {
    map: HashMap<Option<AccountId>, Account>,
    /// The size at which starting an account first forgets those with nothing left to
    /// remember ([`Ledger::sweep`]).
    sweep_at: usize,
}

pub(crate) struct Ledger {
    budget: f64,
    /// `budget`, as the ledger counts.
    budget_nanos: Nanos,
    period: Duration,
    costs: CostTable,
    accounts: Mutex<Accounts>,
    /// Tasks whose cost is awaited, over all accounts, and creates kept with an unknown outcome
    /// whose task may still turn up by their external id: responses are only inspected when
    /// some are.
    awaited: AtomicUsize,
}

/// Counts, not ids: an account's ledger holds thousands of task and external ids.
impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Ledger");
        debug
            .field("budget", &self.budget)
            .field("period", &self.period)
            .field("costs", &self.costs)
            .field("awaited", &self.awaited.load(Ordering::Relaxed));
        let accounts = match self.accounts.try_lock() {
            Ok(accounts) => Some(accounts),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        match accounts {
            Some(accounts) => {
                let sum =
                    |count: fn(&Account) -> usize| accounts.map.values().map(count).sum::<usize>();
                debug
                    .field("accounts", &accounts.map.len())
                    .field("awaited_tasks", &sum(|a| a.tasks.len()))
                    .field("charged_tasks", &sum(|a| a.charged.order.len()))
                    .field("unknown_creates", &sum(|a| a.unknown.len()))
                    .field("sending", &sum(|a| a.sending.total()));
            }
            None => {
                debug.field("accounts", &format_args!("<locked>"));
            }
        }
        debug.finish()
    }
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, Accounts> {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The account's entry, started or rolled into the current period. Starting one sweeps
    /// the accounts first when they have reached [`Accounts::sweep_at`].
    fn account<'a>(
        &self,
        accounts: &'a mut Accounts,
        key: &Option<AccountId>,
        now: Instant,
    ) -> &'a mut Account {
        if accounts.map.len() >= accounts.sweep_at && !accounts.map.contains_key(key) {
            self.sweep(accounts, now);
        }
        let account = accounts.map.entry(key.clone()).or_insert_with(|| Account {
            period_start: now,
            committed: 0,
            open: 0,
            tasks: HashMap::new(),
            charged: ChargedTasks::default(),
            unknown: UnknownCreates::default(),
            sending: IdCounts::default(),
        });
        if now >= account.period_start + self.period {
            let periods = (now - account.period_start).as_nanos() / self.period.as_nanos().max(1);
            let advance = self
                .period
                .checked_mul(u32::try_from(periods).unwrap_or(u32::MAX))
                .unwrap_or(now - account.period_start);
            account.period_start += advance;
            // The creates reserved before and not settled yet are sent, if at all, in this
            // period: they count in it. Forgotten, as they were, a period could spend its
            // whole budget on top of every create that waited at its start.
            account.committed = account.open;
            self.awaited.fetch_sub(
                account.tasks.len() + account.unknown.len(),
                Ordering::Relaxed,
            );
            // Charged to the period that ended: a create answered with one now owes nothing.
            for (id, _) in account.tasks.drain() {
                account.charged.insert(id);
            }
            // Charged to the period that ended too, but no task is known to exist: one a lookup
            // reports now is charged here (over-counted at worst, as an unknown outcome always
            // is).
            account.unknown.clear();
        }
        account
    }

    /// Forgets every account with [nothing left to remember](Self::forgettable), then sets
    /// the next sweep at twice the accounts left (at least [`SWEEP_AT_LEAST`]): a sweep visits
    /// at most twice as many accounts as were started since the last, O(1) per account
    /// started, and the map stays under twice the accounts that had something to remember at
    /// the last sweep.
    #[cold]
    #[inline(never)]
    fn sweep(&self, accounts: &mut Accounts, now: Instant) {
        let mut awaited = 0;
        accounts.map.retain(|_, account| {
            let forget = self.forgettable(account, now);
            if forget {
                // What rolling its period over would have stopped awaiting.
                awaited += account.tasks.len() + account.unknown.len();
            }
            !forget
        });
        self.awaited.fetch_sub(awaited, Ordering::Relaxed);
        accounts.sweep_at = accounts.map.len().saturating_mul(2).max(SWEEP_AT_LEAST);
        // The buckets of a crowd gone: memory follows the accounts kept.
        if accounts.map.capacity() > accounts.sweep_at.saturating_mul(4) {
            accounts.map.shrink_to(accounts.sweep_at);
        }
    }

    /// Whether forgetting `account` changes no later decision but to count more: no create is
    /// out (reserved, or carrying an external id), and its period has ended (rolled over, it
    /// would start from nothing but the tasks it was charged for) or holds nothing (no charge,
    /// no task awaiting a cost, no create of unknown outcome). Started again, its next create
    /// starts its period, later than its own would have (its creates count for longer), and
    /// the tasks it was charged for are forgotten (a create answered with one is charged
    /// again).
    fn forgettable(&self, account: &Account, now: Instant) -> bool {
        account.open == 0
            && account.sending.is_empty()
            && (now >= account.period_start + self.period
                || (account.committed == 0
                    && account.tasks.is_empty()
                    && account.unknown.is_empty()))
    }

    /// Reserves `estimate` credits for a create sent with the caller's `external_id` ([as
    /// kept](kept_id), as every id below), returning what was reserved (to settle it with), or
    /// refuses the create.
    fn reserve(
        &self,
        key: &Option<AccountId>,
        estimate: f64,
        external_id: Option<&str>,
    ) -> Result<Nanos, BudgetExceeded> {
        let now = Instant::now();
        let reserved = to_nanos(estimate);
        let mut accounts = self.lock();
        let account = self.account(&mut accounts, key, now);
        if account.committed.saturating_add(reserved) > self.budget_nanos {
            return Err(BudgetExceeded {
                account: key.clone(),
                budget: self.budget,
                committed: to_credits(account.committed),
                estimate,
                resets_in: (account.period_start + self.period).saturating_duration_since(now),
            });
        }
        account.committed = account.committed.saturating_add(reserved);
        account.open = account.open.saturating_add(reserved);
        account.sending(external_id);
        Ok(reserved)
    }

    /// Settles a reservation as spent with no task to read its cost from (a success that
    /// named none, a create whose fate is unknown): it stays charged to the current period and
    /// is carried no further. With the create's `external_id`, it is remembered: the task that
    /// turns up with that id is charged this estimate ([`UnknownCreates`]). `sent_id` is the
    /// caller's external id, as reserved.
    fn kept(
        &self,
        key: &Option<AccountId>,
        estimate: Nanos,
        sent_id: Option<&str>,
        external_id: Option<String>,
    ) {
        let mut accounts = self.lock();
        let account = self.account(&mut accounts, key, Instant::now());
        account.open = account.open.saturating_sub(estimate);
        account.settled(sent_id);
        if let Some(id) = external_id
            && !account.unknown.insert(id, estimate)
        {
            // Awaited (the fast path of `observe`) unless the oldest made room for it.
            self.awaited.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Gives a reservation back (the create, sent with the caller's `sent_id`, did not
    /// happen), in whichever period it was carried into.
    fn release(&self, key: &Option<AccountId>, estimate: Nanos, sent_id: Option<&str>) {
        let mut accounts = self.lock();
        let account = self.account(&mut accounts, key, Instant::now());
        account.open = account.open.saturating_sub(estimate);
        account.settled(sent_id);
        account.committed = account.committed.saturating_sub(estimate);
    }

    /// Records the task a create made, in the current period (its reservation, carried into
    /// it, is charged there), then applies its report. A task already charged (another create
    /// answered with it) is one task: this create's reservation goes back.
    ///
    /// A task not charged yet is this create's, even when it carries the external id of an
    /// earlier create kept with an unknown outcome: whether Kling answers a duplicate external
    /// id with the task it made, refuses it (`1201`, as kling-mock does) or makes a second task
    /// is unconfirmed, and in the last case both creates are billed. Only a lookup or callback
    /// ([`observe`](Self::observe)) hands an unknown create's estimate to its task, and not
    /// while a create with that external id is out (`sent_id`, the caller's, as reserved):
    /// the task may be that create's, which this answer then charges.
    fn created(
        &self,
        key: &Option<AccountId>,
        estimate: Nanos,
        sent_id: Option<&str>,
        report: &TaskReport,
    ) {
        let mut accounts = self.lock();
        let account = self.account(&mut accounts, key, Instant::now());
        account.open = account.open.saturating_sub(estimate);
        account.settled(sent_id);
        let task = kept_id(&report.id);
        if account.tasks.contains_key(&*task) || account.charged.contains(&task) {
            account.committed = account.committed.saturating_sub(estimate);
        } else {
            account.tasks.insert(task.into_owned(), estimate);
            self.awaited.fetch_add(1, Ordering::Relaxed);
        }
        self.apply(account, report);
    }

    /// Applies task reports from a query or callback of `key`'s account.
    fn observe(&self, key: &Option<AccountId>, reports: &[TaskReport]) {
        if self.awaited.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut accounts = self.lock();
        // An account that never created (or was forgotten) awaits no cost: a report starts no
        // period for it.
        if !accounts.map.contains_key(key) {
            return;
        }
        let account = self.account(&mut accounts, key, Instant::now());
        for report in reports {
            Self::match_unknown(account, report);
            self.apply(account, report);
        }
    }

    /// Charges a reported task not charged yet the estimate of a create kept with an unknown
    /// outcome and the external id the report echoes (a lookup by that id, a callback): that
    /// create's task. Awaited as the create was: the count stays. Not while a create with that
    /// external id is out (a resend): the task may be its, and its answer charges it its own
    /// estimate; the unknown create's stays charged for the task it may have made, found by a
    /// later report (none: over-counted, as an unknown outcome is).
    fn match_unknown(account: &mut Account, report: &TaskReport) {
        if account.unknown.is_empty() {
            return;
        }
        let Some(external_id) = report.external_id.as_deref() else {
            return;
        };
        let task = kept_id(&report.id);
        if account.tasks.contains_key(&*task) || account.charged.contains(&task) {
            return;
        }
        let external_id = kept_id(external_id);
        if account.sending.contains(&external_id) {
            return;
        }
        if let Some(kept) = account.unknown.take(&external_id) {
            account.tasks.insert(task.into_owned(), kept);
        }
    }

    fn apply(&self, account: &mut Account, report: &TaskReport) {
        if !report.status.is_terminal() {
            return;
        }
        // Only a cost in credits replaces the estimate: one in another currency (`USD`) would
        // be booked as that many credits, and the estimate it replaced is in credits. A report
        // without one (a callback body carries no cost; a cost in dollars) leaves the task
        // awaiting a later one (a query's) until the period ends.
        let Some(cost) = report
            .cost_in_credits()
            .filter(|c| c.is_finite() && *c >= 0.0)
        else {
            return;
        };
        let Some((id, estimate)) = account.tasks.remove_entry(&*kept_id(&report.id)) else {
            return;
        };
        self.awaited.fetch_sub(1, Ordering::Relaxed);
        account.charged.insert(id);
        account.committed = account
            .committed
            .saturating_sub(estimate)
            .saturating_add(to_nanos(cost));
    }
}

/// Applies [`SpendGuard`] to a service. See the [module docs](self).
///
/// # Clone
///
/// Clones, and every service they build, share one ledger: the budget is spent once.
#[derive(Clone, Debug)]
pub struct SpendGuardLayer {
    ledger: Arc<Ledger>,
}

impl SpendGuardLayer {
    /// A budget of `credits` per day, with creates priced by `costs`.
    pub fn new(credits: f64, costs: CostTable) -> Result<SpendGuardLayer, ConfigError> {
        SpendGuardLayer::with_period(credits, Duration::from_secs(24 * 60 * 60), costs)
    }

    /// A budget of `credits` per `period`.
    pub fn with_period(
        credits: f64,
        period: Duration,
        costs: CostTable,
    ) -> Result<SpendGuardLayer, ConfigError> {
        if !(credits.is_finite() && credits >= 0.0) {
            return Err(ConfigError::new(
                "daily_credits",
                "must be a finite number, 0 or more",
            ));
        }
        if period.is_zero() {
            return Err(ConfigError::new("credit_period_secs", "must be above 0"));
        }
        // As `StackConfig` checks it: a period start plus the period must stay an `Instant`.
        if period > MAX_DURATION {
            return Err(ConfigError::new(
                "credit_period_secs",
                "must be at most a year",
            ));
        }
        costs.validate()?;
        Ok(SpendGuardLayer {
            ledger: Arc::new(Ledger {
                budget: credits,
                budget_nanos: to_nanos(credits),
                period,
                costs,
                accounts: Mutex::new(Accounts {
                    map: HashMap::new(),
                    sweep_at: SWEEP_AT_LEAST,
                }),
                awaited: AtomicUsize::new(0),
            }),
        })
    }

    /// The guard a configuration asks for (its budget and period, at its speed), or `None`
    /// when it sets no budget.
    pub fn from_config(
        config: &StackConfig,
        costs: CostTable,
    ) -> Result<Option<SpendGuardLayer>, ConfigError> {
        config.validate()?;
        config
            .credit_budget()
            .map(|credits| {
                SpendGuardLayer::with_period(credits, config.credit_period_duration(), costs)
            })
            .transpose()
    }

    /// The credit budget of one period.
    pub fn budget(&self) -> f64 {
        self.ledger.budget
    }

    /// Credits spent or reserved by an account in the current period.
    pub fn committed(&self, account: Option<&AccountId>) -> f64 {
        to_credits(self.committed_nanos(account))
    }

    fn committed_nanos(&self, account: Option<&AccountId>) -> Nanos {
        let key = account.cloned();
        let mut accounts = self.ledger.lock();
        // A look starts nothing: an account's first period starts at its first create.
        if !accounts.map.contains_key(&key) {
            return 0;
        }
        self.ledger
            .account(&mut accounts, &key, Instant::now())
            .committed
    }

    /// What an account has left in the current period (`None`: requests without an
    /// [`AccountId`]; under [`KlingLayer`](crate::KlingLayer), whose requests all carry its
    /// account, ask with [`KlingLayer::account_id`](crate::KlingLayer::account_id)).
    pub fn remaining(&self, account: Option<&AccountId>) -> f64 {
        match self.committed_nanos(account) {
            0 => self.ledger.budget,
            // Subtracted in the ledger's unit: as floats, 0.3 - 0.1 left 0.19999999999999998.
            committed => to_credits(self.ledger.budget_nanos.saturating_sub(committed)),
        }
    }

    /// Applies a task report from elsewhere (a callback): a finished task's cost in credits
    /// replaces its estimate (one in another currency keeps it; see the [module docs](self)).
    pub fn report(&self, account: Option<&AccountId>, report: &TaskReport) {
        self.ledger
            .observe(&account.cloned(), std::slice::from_ref(report));
    }
}

impl<S> Layer<S> for SpendGuardLayer {
    type Service = SpendGuard<S>;

    fn layer(&self, inner: S) -> SpendGuard<S> {
        SpendGuard {
            inner,
            ledger: self.ledger.clone(),
        }
    }
}

/// Refuses creates that would pass the credit budget. See the [module docs](self).
///
/// # Clone
///
/// Clones share the ledger of the [`SpendGuardLayer`] that built them.
#[derive(Clone)]
pub struct SpendGuard<S> {
    inner: S,
    ledger: Arc<Ledger>,
}

impl<S: fmt::Debug> fmt::Debug for SpendGuard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpendGuard")
            .field("inner", &self.inner)
            .field("budget", &self.ledger.budget)
            .finish_non_exhaustive()
    }
}

impl<S> SpendGuard<S> {
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

impl<S, B> Service<Request<B>> for SpendGuard<S>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>>,
    S::Error: Into<BoxError>,
    B: PeekBody,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = future::ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // Only a POST can create; anything else skips recognition.
        let estimate = if request.method() == Method::POST {
            let recognized = Recognized::of(&mut request);
            recognized.is_create().then(|| {
                (
                    self.ledger.costs.estimate(recognized),
                    // Kept should its outcome be unknown: the task it made is found by it. An id
                    // a retry layer below writes in is not here yet (its error names it).
                    recognized
                        .external_id
                        .as_deref()
                        .map(|id| kept_id(id).into_owned()),
                )
            })
        } else {
            None
        };
        let Some((estimate, external_id)) = estimate else {
            let observe = (self.ledger.awaited.load(Ordering::Relaxed) > 0)
                .then(|| (self.ledger.clone(), AccountId::of(&request).cloned()));
            return future::ResponseFuture::observe(self.inner.call(request), observe);
        };
        let account = AccountId::of(&request).cloned();
        match self
            .ledger
            .reserve(&account, estimate, external_id.as_deref())
        {
            Ok(estimate) => {
                // Tells, should the caller drop the create, whether a layer below held it back
                // unsent (a slot's wait), so the estimate goes back. Shared with the metrics
                // layer above, which reads the same watch to count the create or not: a watch
                // of its own here would leave that one unreported, counted as sent.
                let watch = SendWatch::shared(&mut request);
                let mut calling = future::Calling(Some(future::Settle {
                    ledger: self.ledger.clone(),
                    account,
                    estimate,
                    external_id,
                    watch,
                }));
                // Settled by `calling` if this call panics, by the future once it returns.
                let inner = self.inner.call(request);
                match calling.0.take() {
                    Some(settle) => future::ResponseFuture::create(inner, settle),
                    // Never: nothing else takes it.
                    None => future::ResponseFuture::observe(inner, None),
                }
            }
            Err(refused) => future::ResponseFuture::refused(refused),
        }
    }
}
