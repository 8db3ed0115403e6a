//! [`TaskSlotsLayer`]: weighted slots per account and pool, held for a task's server-side life.
//!
//! # Pools
//!
//! A create's pool is the one [`kling_core::Recognized`] gives it: `video`, `image` or `try-on`
//! on legacy paths, the product and model version on new-style ones (`video:kling-3.0`). Kling
//! counts per resource-pack type and, per its newer pages, per model version; where an account
//! counts per type only, [`SlotsConfig::pool_scope`](crate::SlotsConfig::pool_scope) with
//! [`PoolScope::Product`](kling_core::PoolScope::Product) counts every create of a product in
//! the product's pool, models and legacy paths together.
//!
//! # What it does to each request
//!
//! - **Create** (recognised by [`kling_core::Recognized`]): waits, first come first served,
//!   until its pool of its account (the request's [`AccountId`](kling_core::AccountId), else the
//!   configured default) has as many free slots as its weight (`n` for images, else 1), then
//!   sends it. A create that finds them free with nobody ahead is granted and handed to the
//!   inner service in `call` itself (no clone of it, nothing waited); one that waits is held in
//!   its response future with a clone of the inner service, not readied (what the service the
//!   caller readied reserved is given back, as it is for a create refused in `call`: the next
//!   call readies the service again; so a layer below that reserves in `poll_ready`, such as an
//!   in-flight bound, holds nothing for a waiting create), and once
//!   granted readies that clone and sends from there (dropped before it is ready, or refused by
//!   it, it gives its slots back). The response decides what happens to the slots:
//!
//!   | response | slots |
//!   |---|---|
//!   | success with a task id | kept under the task id (and its external id) with a lease |
//!   | success that already reports a terminal status | given back |
//!   | `1303` | given back; the pool's believed capacity is lowered (below); [`SlotGated`](kling_core::signals::SlotGated) is inserted |
//!   | `1102` (also `1100`, `1101`) | given back; further creates of the account fail locally with [`Halted`](crate::error::Halted) until [`SlotsHandle::reset_halt`], also those granted before and still held below the layer (a rate limiter's queue): a classify step ([`ClassifyLayer`](kling_core::ClassifyLayer)) below refuses them unsent, with a backend that counts its halts ([`SlotBackend::create_halts`](crate::backend::SlotBackend::create_halts): the in-process one; kling-redis's `RedisSlots` for the halts it applied or learnt from Redis) |
//!   | `5000`/`5002` (or an undocumented code, unless it came with a 4xx status) | kept under the external id, or under a lease alone: the task may exist |
//!   | any other error code | given back |
//!   | an error that made nothing ([`kling_core::error::may_have_created`] is false): never sent ([`SendState::NotSent`](kling_core::error::SendState)), a layer below refusing it ([`RefusedBeforeSending`](kling_core::error::RefusedBeforeSending)), a 4xx answer that is no Kling envelope (a proxy's 403, 404, 413 or 429 page) | given back |
//!   | client error after sending, a 5xx or 2xx answer nobody can read, or the response future dropped once the create was handed to the inner service (for a create granted at once, that is in `call`, even if the future is never polled; also when the inner future panics) | kept under the external id, or under a lease alone |
//!   | the inner service panicking in `call` (no future was made to send the create), or a metrics recorder panicking as the slots are granted (the create not sent yet) | given back |
//!   | a panic while the result is read, before the backend takes the slots (an error whose `source` panics) | kept under the external id, or under a lease alone, unless the answer read said no task was made (given back) |
//!
//!   A wait respects the request's [`Deadline`](kling_core::signals::Deadline): the create
//!   fails with [`DeadlineExceeded`](crate::error::DeadlineExceeded) instead of waiting past it,
//!   for its slots or, once granted, for the service below to be ready (its slots then go back:
//!   [`slots_granted`](crate::error::DeadlineExceeded::slots_granted)).
//!   Dropping a waiting create holds nothing. A create that waits in a pool whose capacity
//!   [`SlotsHandle::set_capacity`] lowers below its weight fails with
//!   [`OverCapacity`](crate::error::OverCapacity) at once, as one too heavy on arrival does,
//!   and no longer holds up the creates behind it. A wait is added to the response's
//!   [`Waited`](kling_core::signals::Waited) extension and recorded as
//!   [`SLOTS_WAIT`](kling_core::metrics::SLOTS_WAIT).
//! - **Query and list** (legacy single, legacy list, new `/tasks` batch or page): pass through;
//!   every task the response reports with a terminal status releases its slots (one response
//!   can end several tasks), every running one renews its lease. A task reported with its
//!   external id also ends (or renews, and is from then on known by its task id) what a create
//!   of unknown outcome of the same account (the request's, else the default) holds under that
//!   external id: external ids are the caller's and unique per account only, so one account's
//!   answers never settle another's holdings by external id (task ids, the server's, are found
//!   in any account). External ids may be unique per create path only (the mock's rule: a
//!   legacy task is looked up at `{create path}/{external id}`), so a holding is found by
//!   external id only by a report of a task created on its own path (a legacy query at
//!   `{create path}/…` or list at `{create path}?…`; new-style tasks share one), and never
//!   one whose task id is known (the report names another task id); a report that names no
//!   path (a callback, `complete`) finds none when two holdings of the account could be it. A lookup by external id (legacy
//!   `GET {create path}/{external id}`, new `GET /tasks?external_task_ids=…`, as the retry layer
//!   sends before creating again) that finds no task (`1203`, or a new-style `data` list read in
//!   whole without it, `[]` included: the rule the retry layer sends the create again by) gives
//!   back what is held under that external id at once: that create never happened. It does
//!   not end a task whose id is known (its create was answered, or a report named it): a
//!   legacy lookup on another create path, or one the server has not indexed yet, finds
//!   nothing for a task that runs. An answer whose `data` cannot be read (`null`, missing)
//!   ends nothing.
//! - Anything else passes through untouched.
//!
//! Slots are released **exactly once**, by whichever comes first: a query or list response, a
//! callback ([`SlotsHandle::on_callback`], or [`SlotsHandle::on_callback_in`] for a named
//! account), [`SlotsHandle::complete`] ([`SlotsHandle::complete_in`]), or the lease (the
//! configured maximum task lifetime, counted from the create or the last report of the task
//! running).
//!
//! # The `1303` rule
//!
//! A `1303` means someone we cannot see (another process, another key of the account, tasks
//! from before a restart) holds slots of the pool. The pool's believed capacity drops to the
//! slots this layer holds there now (`hidden = configured − in_use`), so no further create of
//! the pool is sent until one of ours ends. Hidden slots come back one per task of the pool that
//! ends here, and one per [`recovery_interval`](crate::SlotsConfig::recovery_interval)
//! ([`DEFAULT_RECOVERY_INTERVAL`](crate::DEFAULT_RECOVERY_INTERVAL), 20 s) without a new `1303`;
//! another `1303` lowers it again. The retried create (the retry layer retries at once on
//! `SlotGated`) waits here meanwhile.
//!
//! A `1303` again at no more slots than the last one's (counting the refused create), for a
//! create granted after it, says the hidden slots are not coming back soon: someone's long
//! work, or a capacity set higher than the account has (the `1303`s of a burst of creates
//! already on their way count as one). Each such `1303` in a row doubles the recovery interval, up to
//! 2^[`MAX_RECOVERY_DOUBLINGS`](crate::MAX_RECOVERY_DOUBLINGS) times (640 s at the default), and
//! while the streak lasts an ended task frees only its own slots. A create that succeeds with
//! the tasks held reaching the refused level ends the streak, as does setting the pool's
//! capacity. Without the streak, a pool told twice the slots it has met a `1303` after about
//! every ended task (9–17% of all requests in `kling-bench goodput`'s "unknown slots" runs;
//! 1.0–2.8% with it, and the same makespan as when told the true slots).
//!
//! # Position
//!
//! Under the retry layer (each attempt of a create waits for its own slot) and over the rate
//! limiter (a create holding a slot is paced, not the other way round), over
//! [`ClassifyLayer`](kling_core::ClassifyLayer) (it reads the [`Outcome`](kling_core::Outcome);
//! without one, it parses the buffered body itself). A layer below that reserves in
//! `poll_ready` ([`InFlightLayer`](crate::InFlightLayer), tower's `ConcurrencyLimit`) is fine
//! here: a waiting create readies its own clone of the service below only once granted.

pub mod future;
mod handle;
mod layer;
mod service;

pub use handle::{LEGACY_PATHS, Reconcile, Reconciled, SlotsHandle, Snapshot};
pub use layer::TaskSlotsLayer;
pub use service::TaskSlots;
