//! [`SlotsHandle`]: callbacks, reconcile, halts, capacities and snapshots.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use kling_core::error::{ApiError, BoxError};
use kling_core::{AccountId, Code, Envelope, Outcome, Pool, Recognized, TaskReport};
use tower_service::Service;

use super::layer::Settings;
use crate::backend::{
    Applied, CreatePath, InProcess, PoolSnapshot, Released, SlotBackend, SlotKey, SlotOp, TaskRef,
    TaskUpdate,
};
use crate::error::{BackendError, BadCallback, ReconcileFailed};

/// The legacy create paths [`Reconcile::new`] lists by default.
pub const LEGACY_PATHS: &[&str] = &[
    "/v1/videos/text2video",
    "/v1/videos/image2video",
    "/v1/videos/multi-image2video",
    "/v1/videos/video-extend",
    "/v1/videos/lip-sync",
    "/v1/videos/advanced-lip-sync",
    "/v1/videos/motion-control",
    "/v1/videos/multi-elements",
    "/v1/videos/avatar/image2video",
    "/v1/videos/effects",
    "/v1/images/generations",
    "/v1/images/multi-image2image",
    "/v1/images/omni-image",
    "/v1/images/editing/expand",
    "/v1/images/kolors-virtual-try-on",
];

/// The largest page Kling serves (legacy `pageSize`, new `limit`).
const PAGE_SIZE: usize = 500;

/// At most this many pages are read per legacy path, and per new-style product type and
/// status (250 000 tasks at full pages): a server whose list never ends (a full page, or a
/// next cursor, every time) must not keep a reconcile listing forever.
const MAX_PAGES: usize = 500;

/// A handle on a [`TaskSlotsLayer`](crate::TaskSlotsLayer)'s slots, from
/// [`TaskSlotsLayer::pair`](crate::TaskSlotsLayer::pair) or
/// [`handle`](crate::TaskSlotsLayer::handle).
///
/// # Clone
///
/// Clones share the backend (every slot, lease, halt and capacity).
pub struct SlotsHandle<B = InProcess> {
    backend: B,
    settings: Arc<Settings>,
}

impl<B: Clone> Clone for SlotsHandle<B> {
    fn clone(&self) -> Self {
        SlotsHandle {
            backend: self.backend.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for SlotsHandle<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotsHandle")
            .field("backend", &self.backend)
            .field("lease", &self.settings.lease)
            .finish()
    }
}

/// Every pool's state at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pools: Vec<PoolSnapshot>,
}

impl Snapshot {
    /// Every known pool, ordered by account and pool.
    pub fn pools(&self) -> &[PoolSnapshot] {
        &self.pools
    }

    /// One pool of one account, if it has been used.
    pub fn get(&self, account: &AccountId, pool: &Pool) -> Option<&PoolSnapshot> {
        self.pools
            .iter()
            .find(|p| p.key.account == *account && p.key.pool == *pool)
    }
}

/// What [`SlotsHandle::reconcile`] lists: the legacy create paths (each listed with
/// `GET {path}?pageNum=N&pageSize=500`) and the new-style product types (each listed with
/// `POST /tasks`, filtered by status and `product_type`), with the pool each new-style product's
/// tasks count in (new-style list entries do not say their model), and the pools of tasks
/// a caller places by their task or external id ([`task_in`](Self::task_in),
/// [`external_id_in`](Self::external_id_in)).
#[derive(Clone)]
#[non_exhaustive]
pub struct Reconcile {
    base_url: String,
    legacy_paths: Vec<String>,
    new_style: Vec<(String, Pool)>,
    by_task_id: HashMap<String, Pool>,
    by_external_id: HashMap<String, Pool>,
    account: Option<AccountId>,
}

impl fmt::Debug for Reconcile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconcile")
            .field("base_url", &without_user_info(&self.base_url))
            .field("legacy_paths", &self.legacy_paths)
            .field("new_style", &self.new_style)
            .field("by_task_id", &self.by_task_id)
            .field("by_external_id", &self.by_external_id)
            .field("account", &self.account)
            .finish()
    }
}

/// `url` with the user info of its authority (`user:password@`, a secret) shown as
/// `<redacted>@`, for `Debug`.
fn without_user_info(url: &str) -> std::borrow::Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority = &url[start..];
    let end = authority.find(['/', '?', '#']).unwrap_or(authority.len());
    match authority[..end].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &url[..start], &authority[at..]).into(),
        None => url.into(),
    }
}

impl Reconcile {
    /// Lists [`LEGACY_PATHS`] under `base_url` (e.g. `https://api-singapore.klingai.com`, or
    /// `""` for a service that takes bare paths), and no new-style product.
    pub fn new(base_url: impl Into<String>) -> Self {
        Reconcile {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            legacy_paths: LEGACY_PATHS.iter().map(|p| (*p).to_owned()).collect(),
            new_style: Vec::new(),
            by_task_id: HashMap::new(),
            by_external_id: HashMap::new(),
            account: None,
        }
    }

    /// Replaces the legacy paths listed.
    pub fn legacy_paths<I: IntoIterator<Item = P>, P: Into<String>>(mut self, paths: I) -> Self {
        self.legacy_paths = paths.into_iter().map(Into::into).collect();
        self
    }

    /// Also lists new-style tasks of `product_type` (e.g. `text-to-video`) and counts them in
    /// `pool` (e.g. `video:kling-3.0`). A product type is listed once: named again, with
    /// another pool, the first pool stays its tasks' (a list does not say the model; see
    /// [`task_in`](Self::task_in) for tasks of several models).
    pub fn new_style(mut self, product_type: impl Into<String>, pool: Pool) -> Self {
        let product_type = product_type.into();
        if !self.new_style.iter().any(|(p, _)| *p == product_type) {
            self.new_style.push((product_type, pool));
        }
        self
    }

    /// Counts a listed task that carries `external_id` in `pool`, whatever its path's or
    /// product's pool: list entries do not say their model, so a caller that knows which
    /// model each of its creates asked for (a batch's journal) keeps each task in its own
    /// model's pool rather than in one pool per product.
    pub fn external_id_in(mut self, external_id: impl Into<String>, pool: Pool) -> Self {
        self.by_external_id.insert(external_id.into(), pool);
        self
    }

    /// Counts the listed task `task_id` in `pool`, whatever its path's or product's pool (as
    /// [`external_id_in`](Self::external_id_in), for a task whose id the caller kept).
    pub fn task_in(mut self, task_id: impl Into<String>, pool: Pool) -> Self {
        self.by_task_id.insert(task_id.into(), pool);
        self
    }

    /// The account whose tasks are listed (set as the requests' [`AccountId`] extension, and
    /// the account they are adopted into); default: the layer's default account.
    pub fn account(mut self, account: AccountId) -> Self {
        self.account = Some(account);
        self
    }
}

/// What [`SlotsHandle::reconcile`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconciled {
    /// Unfinished tasks the server listed, each counted once (a legacy list read while tasks
    /// are created shifts its pages, and names a task on two pages).
    pub unfinished: usize,
    /// Of those, tasks not yet known here, now holding slots.
    pub adopted: usize,
    /// Legacy paths left out because the server refused to list them as not this account's
    /// to use or not there (`1103`, `1202`, `1203`: an endpoint the account has no
    /// permission for, or one its region does not serve), so one such path does not keep
    /// every other path's tasks from being adopted; and legacy paths listed that are no
    /// create path known here (no pool to count their tasks in), never asked for.
    pub skipped_paths: usize,
    /// Listings (a legacy path, or a new-style product type and status) stopped before the
    /// server said they ended: at the page cap (500 pages) with more said to follow, or at a
    /// legacy page that repeated the one before twice in a row (a server ignoring `pageNum`;
    /// once may be a page's worth of creates shifting the list), or at a new-style answer
    /// handing back the cursor it was sent. Tasks on the pages not read
    /// are not counted (a `1303` still corrects the pool); each stop is logged as a warning.
    pub truncated_listings: usize,
}

impl<B: SlotBackend> SlotsHandle<B> {
    pub(crate) fn new(backend: B, settings: Arc<Settings>) -> Self {
        SlotsHandle { backend, settings }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The account of requests without an [`AccountId`].
    pub fn default_account(&self) -> &AccountId {
        &self.settings.default_account
    }

    /// Says a task ended (by task id, or by the external id a create of the
    /// [default account](Self::default_account) carried); its slots are released unless
    /// something already did. Returns the release, if this call made it. For a task of another
    /// account named by its external id, see [`complete_in`](Self::complete_in).
    pub async fn complete(&self, task_id: &str) -> Result<Option<Released>, BackendError> {
        self.complete_in(&self.settings.default_account, task_id)
            .await
    }

    /// [`complete`](Self::complete) for a task of `account`: a task id names the task in any
    /// account, an external id (unique per account only) names it in `account` only. External
    /// ids may be unique per create path only: an external id two running creates of the
    /// account carry (on two paths) names neither, and nothing is released.
    ///
    /// Told before the create's answer came (nothing holds under `task_id` yet), the
    /// in-process backend remembers the end as a task id and as an external id of `account`
    /// (for one lease): the create kept under either, when its answer (or unknown outcome)
    /// comes, is released at once, and the other reading is then dropped.
    pub async fn complete_in(
        &self,
        account: &AccountId,
        task_id: &str,
    ) -> Result<Option<Released>, BackendError> {
        let applied = self
            .backend
            .apply(SlotOp::Update {
                account: account.clone(),
                updates: vec![TaskUpdate {
                    id: task_id.to_owned(),
                    external_id: None,
                    status: None,
                }],
                lease: self.settings.lease,
            })
            .await?;
        Ok(applied.released.into_iter().next())
    }

    /// Feeds one task report read elsewhere (a verified callback already parsed, a query's
    /// answer read outside the stack): a terminal status releases the task's slots, a running
    /// one renews its lease and files its task id. The task is found by its task id, else by
    /// its external id within `account` (a create whose answer was lost is held under its
    /// external id only): only a holding whose task id is unknown, and only when one alone
    /// could be it. A report names no create path, and external ids may be unique per path
    /// only: a holding known by another task id is another task, and when creates on two
    /// paths are held under the external id, neither is settled.
    pub async fn report_in(
        &self,
        account: &AccountId,
        report: &TaskReport,
    ) -> Result<Applied, BackendError> {
        self.backend
            .apply(SlotOp::Update {
                account: account.clone(),
                updates: vec![TaskUpdate::from_report(report)],
                lease: self.settings.lease,
            })
            .await
    }

    /// Feeds a callback body (the bare task object Kling posts, legacy or new shape; an
    /// envelope around it is accepted too): a terminal status releases the task's slots, a
    /// running one renews its lease. Verify the signature before calling this. The task is
    /// found by its task id, else by its external id within the
    /// [default account](Self::default_account); for a callback of another account, see
    /// [`on_callback_in`](Self::on_callback_in).
    pub async fn on_callback(&self, payload: &[u8]) -> Result<Applied, BoxError> {
        self.on_callback_in(&self.settings.default_account, payload)
            .await
    }

    /// [`on_callback`](Self::on_callback) for a callback about a task of `account` (e.g. from
    /// a callback URL per account): a task not yet known by its task id is found by its
    /// external id within `account` only (external ids are unique per account only), as
    /// [`report_in`](Self::report_in) finds it.
    pub async fn on_callback_in(
        &self,
        account: &AccountId,
        payload: &[u8],
    ) -> Result<Applied, BoxError> {
        let tasks = parse_callback(payload)?;
        let updates = tasks.iter().map(TaskUpdate::from_report).collect();
        let applied = self
            .backend
            .apply(SlotOp::Update {
                account: account.clone(),
                updates,
                lease: self.settings.lease,
            })
            .await?;
        Ok(applied)
    }

    /// Lifts the local halt of `account` after `1102`; returns whether it was halted.
    pub async fn reset_halt(&self, account: &AccountId) -> Result<bool, BackendError> {
        let applied = self
            .backend
            .apply(SlotOp::ResetHalt(account.clone()))
            .await?;
        Ok(applied.changed)
    }

    /// Sets a pool's capacity at run time, for one account or (`None`) every account. A
    /// product-wide pool (`video`) also sets its model pools unless they have their own
    /// setting. Capacity 0 holds every create of the pool. Lowered, creates already waiting
    /// that need more slots than the new capacity fail with
    /// [`OverCapacity`](crate::error::OverCapacity) (naming the pool, their weight and the
    /// capacity), as a create that needs more than its pool has does when it arrives; those
    /// behind them no longer wait behind them. Under
    /// [`PoolScope::Product`](kling_core::PoolScope::Product) creates count in the product's
    /// pool only, so a model's pool set here is never used.
    pub async fn set_capacity(
        &self,
        account: Option<&AccountId>,
        pool: Pool,
        capacity: u32,
    ) -> Result<(), BackendError> {
        self.backend
            .apply(SlotOp::SetCapacity {
                account: account.cloned(),
                pool,
                capacity,
            })
            .await?;
        Ok(())
    }

    /// Slots in use, believed capacity, configured capacity, waiters and tasks of every pool.
    pub async fn snapshot(&self) -> Result<Snapshot, BackendError> {
        Ok(Snapshot {
            pools: self.backend.snapshot().await?,
        })
    }

    /// Lists the account's unfinished tasks on the server (both API generations, see
    /// [`Reconcile`]) and adopts each one not known here into its pool, so a restarted
    /// process does not over-admit. What a page says of a task held here is applied as a list
    /// through the layer applies it, whichever `service` lists: an ended task's slots are freed,
    /// a running one's lease renewed. Legacy image tasks count 1 slot each (a list does not say
    /// their `n`); a pool that turns out fuller still corrects itself through `1303`. A task
    /// whose end a report (a callback, a query) told, before the listing began or while it
    /// ran, is not adopted, even when a list answered before that end names it running (the
    /// in-process backend remembers the last 4096 such ends, each for a lease:
    /// [`SlotBackend::begin_listing`]) — when the task was held here, or the report was of
    /// it alone. The end of a task not held here that a batch answer or a list page told is
    /// not remembered (those name many tasks long ended, and would push out the ends that
    /// matter): a list running behind adopts it, until its end is reported again or its
    /// lease runs out.
    ///
    /// A legacy list is read until an empty page, or one shorter than a page the server
    /// already served: a server may serve fewer entries than the 500 asked for, so a short
    /// page alone is no end. New-style tasks are listed `submitted` first, then `processing`,
    /// each until no next cursor. At most 500 pages are read a listing; one stopped there, or
    /// at a legacy page repeating the one before twice in a row (once may be a page's worth
    /// of creates between two requests shifting the list), or at a new-style answer handing
    /// back the cursor it was sent, is logged and counted in
    /// [`Reconciled::truncated_listings`].
    ///
    /// Each page's tasks are adopted as soon as the page is answered, so an end reported
    /// after a page was asked for has to be remembered for that page's round trip only, not
    /// for the whole reconcile: a task ended after its page is either still held when it is
    /// adopted (nothing adopted) or remembered. Only more than 4096 ends of this process's
    /// tasks between a task's end and its page's answer (a list that runs that far behind, or
    /// one page's round trip that long) let such a task be adopted, its slot then held until
    /// its lease runs out. A reconcile that fails part way keeps what it adopted (the tasks
    /// listed running), and fails with [`ReconcileFailed`], which names the listing and page
    /// that failed and what was found until then, its cause as its source.
    ///
    /// `service` is the client to list with (with auth; it may be the whole stack).
    pub async fn reconcile<S>(
        &self,
        service: &mut S,
        plan: &Reconcile,
    ) -> Result<Reconciled, BoxError>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>>,
        S::Error: Into<BoxError>,
    {
        let account = plan
            .account
            .clone()
            .unwrap_or_else(|| self.settings.default_account.clone());
        // From before the first list goes out until the last adopt: a task a report ends
        // meanwhile is remembered, and a list answered before that end does not adopt it.
        self.backend.begin_listing();
        let _listing = Listing(&self.backend);
        let mut reconciled = Reconciled::default();
        // The unfinished tasks counted so far (at most every entry of the pages read).
        let mut seen = HashSet::new();
        for path in &plan.legacy_paths {
            let listing = || format!("legacy list {path}");
            let uri: Uri = format!("{}{path}", plan.base_url)
                .parse()
                .map_err(|e| failed(listing(), None, reconciled, e))?;
            // Its tasks were created on it: one it names by external id is no other path's
            // create (external ids may be unique per create path only).
            let on = CreatePath::legacy(uri.path());
            let Some(pool) = Recognized::from_parts(&Method::POST, &uri, b"{}").pool else {
                // Told, not ignored: the caller's plan names a path whose tasks go uncounted.
                reconciled.skipped_paths += 1;
                continue;
            };
            let mut paging = LegacyPaging::default();
            let mut ended = false;
            for page in 1..=MAX_PAGES {
                let request = Request::get(format!(
                    "{}{path}?pageNum={page}&pageSize={PAGE_SIZE}",
                    plan.base_url
                ))
                .extension(account.clone())
                .body(Full::new(Bytes::new()))
                .map_err(|e| failed(listing(), Some(page), reconciled, e))?;
                let (outcome, page_len, identity) = match list(service, request).await {
                    Ok(listed) => (listed.outcome, listed.entries, listed.identity),
                    Err(error) if page == 1 && not_listable(&*error) => {
                        reconciled.skipped_paths += 1;
                        ended = true;
                        break;
                    }
                    Err(error) => return Err(failed(listing(), Some(page), reconciled, error)),
                };
                // The page's own length: an entry that does not read is still an entry.
                let n = page_len.unwrap_or(outcome.tasks().len());
                let listed = (&account, &pool, on);
                self.adopt(listed, plan, &outcome, &mut reconciled, &mut seen)
                    .await
                    .map_err(|e| failed(listing(), Some(page), reconciled, e))?;
                match paging.after(n, identity) {
                    PageEnd::More => {}
                    PageEnd::Last => {
                        ended = true;
                        break;
                    }
                    PageEnd::Repeated => {
                        tracing::warn!(
                            path = %path,
                            page,
                            "reconcile: the server answered two legacy list pages in a row with \
                             the page before (pageNum ignored?); later pages are not listed"
                        );
                        reconciled.truncated_listings += 1;
                        ended = true;
                        break;
                    }
                }
            }
            if !ended {
                tracing::warn!(
                    path = %path,
                    pages = MAX_PAGES,
                    "reconcile: legacy list still not at its end after the page cap; \
                     later pages are not listed"
                );
                reconciled.truncated_listings += 1;
            }
        }
        for (product_type, pool) in &plan.new_style {
            // In the order a task moves: one that moves on between the two lists was
            // `submitted` when the first was answered, or is `processing` (or ended) at the
            // second; listed the other way round, it would be named by neither.
            for status in ["submitted", "processing"] {
                let mut cursor: Option<String> = None;
                let mut ended = false;
                let listing = || format!("new-style list of {product_type} tasks {status}");
                for page in 1..=MAX_PAGES {
                    let mut body = serde_json::json!({
                        "status": status,
                        "product_type": product_type,
                        "limit": PAGE_SIZE,
                    });
                    if let Some(cursor) = &cursor {
                        body["cursor"] = serde_json::Value::String(cursor.clone());
                    }
                    let request = Request::post(format!("{}/tasks", plan.base_url))
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .extension(account.clone())
                        .body(Full::new(Bytes::from(body.to_string())))
                        .map_err(|e| failed(listing(), Some(page), reconciled, e))?;
                    let listed = list(service, request)
                        .await
                        .map_err(|e| failed(listing(), Some(page), reconciled, e))?;
                    let on = (&account, pool, CreatePath::NEW_STYLE);
                    self.adopt(on, plan, &listed.outcome, &mut reconciled, &mut seen)
                        .await
                        .map_err(|e| failed(listing(), Some(page), reconciled, e))?;
                    match listed.next {
                        // The cursor it was sent, handed back: asking on would only get this
                        // page again, up to the page cap.
                        Some(next) if cursor.as_ref() == Some(&next) => {
                            tracing::warn!(
                                product_type = %product_type,
                                status,
                                "reconcile: the server answered a new-style list page with the \
                                 cursor it was sent; later pages are not listed"
                            );
                            reconciled.truncated_listings += 1;
                            ended = true;
                            break;
                        }
                        Some(next) => cursor = Some(next),
                        None => {
                            ended = true;
                            break;
                        }
                    }
                }
                if !ended {
                    tracing::warn!(
                        product_type = %product_type,
                        status,
                        pages = MAX_PAGES,
                        "reconcile: new-style list still names a next cursor after the page \
                         cap; later pages are not listed"
                    );
                    reconciled.truncated_listings += 1;
                }
            }
        }
        Ok(reconciled)
    }

    /// Adopts the unfinished tasks one page of a reconcile's list of tasks created on `path`
    /// names, into `pool` of `account`, as soon as the page is answered: an end reported after
    /// the page was asked for (a callback of a task the page names running) is then at most
    /// one page's round trip old when its adopt looks for it, not the whole reconcile's, which
    /// the bounded memory of ends ([`SlotBackend::begin_listing`]) may have forgotten by the
    /// end of a long reconcile of a busy account. A task in `seen` (named by an earlier page)
    /// is neither counted nor adopted again. A task the plan places by its task or external id
    /// goes to that pool.
    async fn adopt(
        &self,
        (account, pool, path): (&AccountId, &Pool, CreatePath),
        plan: &Reconcile,
        page: &Outcome,
        reconciled: &mut Reconciled,
        seen: &mut HashSet<String>,
    ) -> Result<(), BackendError> {
        // First what the page says of the tasks held here, as a list sent through the layer
        // does: its ended tasks are freed (a callback missed, holdings a backend kept across a
        // restart), its running ones renew their leases. The service listing may be the bare
        // client, whose answers never pass the layer. As a list: the ends it names of tasks
        // not held here are long past, not ends that overtook a create's answer.
        if !page.tasks().is_empty() {
            self.backend
                .observe_list_on(account, page, self.settings.lease, path)
                .await?;
        }
        for task in page.tasks().iter().filter(|t| !t.status.is_terminal()) {
            if !seen.insert(task.id.clone()) {
                continue;
            }
            reconciled.unfinished += 1;
            let placed = plan.by_task_id.get(&task.id).or_else(|| {
                let ext = task.external_id.as_ref()?;
                plan.by_external_id.get(ext)
            });
            let pool = self
                .settings
                .pool_scope
                .apply(placed.unwrap_or(pool).clone());
            let adopt = SlotOp::Adopt {
                key: SlotKey::new(account.clone(), pool),
                task: TaskRef {
                    id: Some(task.id.clone()),
                    external_id: task.external_id.clone(),
                },
                weight: 1,
                lease: self.settings.lease,
            };
            let applied = self.backend.adopt_on(adopt, path).await?;
            if applied.changed {
                reconciled.adopted += 1;
            }
        }
        Ok(())
    }
}

/// `error`, as the failure of a reconcile at `page` of `listing`, having found `so_far`.
fn failed(
    listing: String,
    page: Option<usize>,
    so_far: Reconciled,
    error: impl Into<BoxError>,
) -> BoxError {
    Box::new(ReconcileFailed::new(listing, page, so_far, error.into()))
}

/// Ends the backend's listing when the reconcile that began it returns, fails or is dropped.
struct Listing<'a, B: SlotBackend>(&'a B);

impl<B: SlotBackend> Drop for Listing<'_, B> {
    fn drop(&mut self) {
        self.0.end_listing();
    }
}

/// Where a legacy list ends. Its answer carries no total and no page size, and a server may
/// serve fewer entries a page than `pageSize` asks for (a lower cap of its own): a page
/// shorter than asked is no end by itself, or the tasks of later pages go uncounted and the
/// limiter admits creates that meet `1303`.
#[derive(Default)]
struct LegacyPaging {
    /// The longest page served so far: the server's page size is at least that.
    longest: usize,
    /// The previous page's entry count and [identity](Listed::identity), to tell a server
    /// that ignores `pageNum`.
    previous: Option<(usize, u64)>,
    /// Pages in a row that repeated the one before. One alone is no proof: a page's worth of
    /// creates between two requests shifts the list (newest first) by exactly a page.
    repeats: usize,
}

/// What a legacy list page says of the listing.
enum PageEnd {
    /// Another page may follow.
    More,
    /// The last page: empty, or shorter than one the server already served.
    Last,
    /// The page before, a second time in a row: the server ignores `pageNum`, so listing on
    /// would only repeat.
    Repeated,
}

impl LegacyPaging {
    /// Reads a page of `entries` entries, of [identity](Listed::identity) `identity`.
    fn after(&mut self, entries: usize, identity: u64) -> PageEnd {
        if entries == 0 || entries < self.longest {
            return PageEnd::Last;
        }
        if self.previous == Some((entries, identity)) {
            self.repeats += 1;
            return match self.repeats {
                1 => PageEnd::More,
                _ => PageEnd::Repeated,
            };
        }
        self.repeats = 0;
        self.longest = entries;
        self.previous = Some((entries, identity));
        PageEnd::More
    }
}

/// One list page's answer.
struct Listed {
    outcome: Outcome,
    /// The new-style `next_cursor`.
    next: Option<String>,
    /// How many entries the page holds (`data`, or `data.tasks`), readable or not; `None`
    /// when it holds no list.
    entries: Option<usize>,
    /// Which entries the page holds ([`page_identity`]), to tell the same page served again.
    identity: u64,
}

/// Sends one list request; returns its answer.
async fn list<S>(service: &mut S, request: Request<Full<Bytes>>) -> Result<Listed, BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>>,
    S::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    let mut response = service.call(request).await.map_err(Into::into)?;
    let outcome = Outcome::ensure(&mut response)?;
    if !outcome.is_success() {
        return Err(Box::new(ApiError::from_outcome(&outcome)));
    }
    let (next, entries, identity) = {
        use kling_core::PeekBody;
        let body = response.body().peek_bytes();
        let value = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
        let data = &value["data"];
        let next = match &data["next_cursor"] {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let array = data.as_array().or_else(|| data["tasks"].as_array());
        (
            next,
            array.map(Vec::len),
            array.map_or(0, |a| page_identity(a)),
        )
    };
    Ok(Listed {
        outcome,
        next,
        entries,
        identity,
    })
}

/// A hash of a list page's entries: each one's task id (legacy `task_id`, new `id`), or the
/// whole entry where it has none. By id, so a page served again whose tasks moved on meanwhile
/// is still the same page; by the entry, so a page of entries that do not read as tasks can
/// be told apart too. A hash, so no page's text is held while the next is asked for.
fn page_identity(entries: &[serde_json::Value]) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    for entry in entries {
        match entry.get("task_id").or_else(|| entry.get("id")) {
            Some(id) => (0u8, id.to_string()).hash(&mut hasher),
            None => (1u8, entry.to_string()).hash(&mut hasher),
        }
    }
    hasher.finish()
}

/// Whether a list's refusal says the path is not this account's to list (`1103`) or not there
/// (`1202`, `1203`), rather than a failure that may pass (a `5xx`, a `1302`, no answer).
fn not_listable(error: &(dyn std::error::Error + 'static)) -> bool {
    error.downcast_ref::<ApiError>().is_some_and(|api| {
        matches!(
            api.code(),
            Code::NoPermission | Code::WrongMethod | Code::NotFound
        )
    })
}

/// The tasks of a callback body: a bare task object (either generation) or an envelope.
fn parse_callback(payload: &[u8]) -> Result<Vec<TaskReport>, BadCallback> {
    match Envelope::parse_callback(payload) {
        Ok(tasks) if !tasks.is_empty() => Ok(tasks),
        Ok(_) => Err(BadCallback::new("no task id and status")),
        Err(e) => Err(BadCallback::new(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kling_core::TaskStatus;

    /// A base URL's user info (`user:password@`) is a secret: `Debug` does not show it.
    #[test]
    fn a_plans_debug_shows_no_user_info_of_its_base_url() {
        let plan = Reconcile::new("https://kling:s3cret@proxy.example:8443/kling");
        let text = format!("{plan:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains("https://<redacted>@proxy.example:8443/kling"),
            "{text}"
        );
        for url in ["https://api-singapore.klingai.com", "", "/p@x"] {
            assert_eq!(without_user_info(url), url);
        }
        assert_eq!(without_user_info("u:p@h/x@y"), "<redacted>@h/x@y");
    }

    #[test]
    fn callback_payloads_of_both_generations() {
        let legacy =
            br#"{"task_id":"t1","task_status":"succeed","task_info":{"external_task_id":"e"}}"#;
        let tasks = parse_callback(legacy).unwrap();
        assert_eq!(tasks[0].id, "t1");
        assert_eq!(tasks[0].status, TaskStatus::Succeeded);
        let new = br#"{"id":"t2","status":"processing"}"#;
        assert_eq!(
            parse_callback(new).unwrap()[0].status,
            TaskStatus::Processing
        );
        let wrapped = br#"{"code":0,"data":{"id":"t3","status":"failed"}}"#;
        assert_eq!(parse_callback(wrapped).unwrap()[0].id, "t3");
        assert!(parse_callback(b"{}").is_err());
        assert!(parse_callback(b"not json").is_err());
    }
}
