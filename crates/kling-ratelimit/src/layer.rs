//! [`GcraLayer`], its [`Builder`] and the run-time [`GcraHandle`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kling_core::{AccountId, RequestKind};
use tower_layer::Layer;

use crate::backend::{Backend, BucketKey, InProcess, Policy};
use crate::error::ConfigError;
use crate::pause::LocalPauses;
use crate::policy::{Adaptive, Cooldown};
use crate::queue::Queues;
use crate::quota::{Quota, QuotaCell};
use crate::service::Gcra;

/// A function that names the key a request is counted under, replacing its
/// [`AccountId`] extension; `None` counts it under the one shared key.
pub type KeyFn = Arc<dyn Fn(&http::request::Parts) -> Option<AccountId> + Send + Sync>;

/// What a request does when its key has no room now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// Wait in the key's FIFO queue (the default, for clients).
    #[default]
    Wait,
    /// Fail at once with [`RateLimited`](crate::error::RateLimited), which carries the wait
    /// (for servers and routers, which ignore backpressure).
    Reject,
}

/// The state every clone of a layer, its services and its handle share.
pub(crate) struct Shared<Bk> {
    pub(crate) backend: Bk,
    pub(crate) quota: QuotaCell,
    pub(crate) classes: Vec<(RequestKind, QuotaCell)>,
    pub(crate) cooldown: Cooldown,
    pub(crate) adaptive: Option<Adaptive>,
    pub(crate) mode: Mode,
    pub(crate) max_queue: Option<usize>,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) key_fn: Option<KeyFn>,
    pub(crate) queues: Arc<Queues>,
    /// Bumped by every quota change; a sleeping head that sees it move asks again.
    pub(crate) epoch: AtomicU64,
    /// Whether every success must be reported (this process received a pause, so a streak may
    /// be running); otherwise a success is reported only while the backend says a streak is
    /// running ([`Backend::streak_running`]). An adaptive limiter reports every success
    /// unless the backend says its key is at its ceiling ([`Backend::adaptive_at_ceiling`]).
    pub(crate) report_success: AtomicBool,
    /// Keys held paused here while their backend's report of the pause is on its way.
    pub(crate) pauses: LocalPauses,
}

impl<Bk> Shared<Bk> {
    pub(crate) fn account_policy(&self) -> Policy {
        Policy::new(self.quota.get(), self.cooldown).with_adaptive(self.adaptive)
    }

    pub(crate) fn class_policy(&self, kind: RequestKind) -> Policy {
        let quota = self
            .classes
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or_else(|| self.quota.get(), |(_, cell)| cell.get());
        Policy::new(quota, self.cooldown)
    }

    pub(crate) fn policy_for(&self, key: &BucketKey) -> Policy {
        match key.request_kind() {
            Some(kind) => self.class_policy(kind),
            None => self.account_policy(),
        }
    }
}

/// One owning pointer to a limiter's shared state, alone on its cache lines: a response future
/// holds its thread's lane ([`kling_core::lanes`]), so the reference counts the futures of one
/// thread write stay on lines no other thread writes.
pub(crate) type Lane<Bk> = kling_core::lanes::Lane<Arc<Shared<Bk>>>;

/// The lanes of one limiter, shared by its layer and services.
pub(crate) type Lanes<Bk> = kling_core::lanes::Lanes<Arc<Shared<Bk>>>;

/// The shared state `lane` points to.
#[inline]
pub(crate) fn shared_of<Bk>(lane: &Lane<Bk>) -> &Arc<Shared<Bk>> {
    lane
}

impl<Bk: fmt::Debug> fmt::Debug for Shared<Bk> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("backend", &self.backend)
            .field("quota", &self.quota.get())
            .field("classes", &self.classes)
            .field("cooldown", &self.cooldown)
            .field("adaptive", &self.adaptive)
            .field("mode", &self.mode)
            .field("max_queue", &self.max_queue)
            .field("max_wait", &self.max_wait)
            .field("key_fn", &self.key_fn.as_ref().map(|_| "fn"))
            .field("waiting", &self.queues.waiting())
            .finish()
    }
}

/// Configures a [`GcraLayer`]; [`build`](Builder::build) checks every field.
pub struct Builder<Bk = InProcess> {
    quota: Quota,
    classes: Vec<(RequestKind, Quota)>,
    cooldown: Cooldown,
    adaptive: Option<Adaptive>,
    mode: Mode,
    max_queue: Option<usize>,
    max_wait: Option<Duration>,
    key_fn: Option<KeyFn>,
    backend: Bk,
}

impl<Bk: fmt::Debug> fmt::Debug for Builder<Bk> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("quota", &self.quota)
            .field("classes", &self.classes)
            .field("cooldown", &self.cooldown)
            .field("adaptive", &self.adaptive)
            .field("mode", &self.mode)
            .field("max_queue", &self.max_queue)
            .field("max_wait", &self.max_wait)
            .field("key_fn", &self.key_fn.as_ref().map(|_| "fn"))
            .field("backend", &self.backend)
            .finish()
    }
}

impl<Bk> Builder<Bk> {
    /// A separate quota for one endpoint class of each account (e.g. `/account/costs` at one
    /// per second). A request of that class passes its class quota first, then the account's.
    pub fn class_quota(mut self, class: RequestKind, quota: Quota) -> Self {
        self.classes.retain(|(k, _)| *k != class);
        self.classes.push((class, quota));
        self
    }

    /// The cooldown rule after a 1302 or a `Retry-After` (default [`Cooldown::default`]).
    pub fn cooldown(mut self, cooldown: Cooldown) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// Turns on the adaptive rate; the quota becomes its ceiling.
    pub fn adaptive(mut self, adaptive: Adaptive) -> Self {
        self.adaptive = Some(adaptive);
        self
    }

    /// Waits or rejects (default [`Mode::Wait`]).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Shorthand for [`Mode::Reject`].
    pub fn reject(self) -> Self {
        self.mode(Mode::Reject)
    }

    /// At most `max` requests wait per key; the next fails with
    /// [`QueueFull`](crate::error::QueueFull). A request counts against the key whose turn it
    /// waits for: a class request against its class key at its class gate, and while it is
    /// held for its class's record of sends (see the [crate docs](crate)); against its
    /// account's key while in its account's queue. Moving to its class key (held, or back from
    /// a paused account), and back from there to its account's queue, never refuses it: it
    /// was waiting already. A class request that would find its account's queue full fails
    /// before it asks its class gate, so it spends no turn of its class quota.
    ///
    /// A request whose first ask of a remote store is on its way is not counted until the
    /// store refuses it; a request refused or queueing leaves room for such asks that came
    /// before it, so places go in arrival order whatever order the answers come back in (a
    /// later request may meet `QueueFull` for an earlier ask the store then admits).
    pub fn max_queue(mut self, max: usize) -> Self {
        self.max_queue = Some(max);
        self
    }

    /// A request that would wait longer fails with
    /// [`WaitExceeded`](crate::error::WaitExceeded) (a request's
    /// [`Deadline`](kling_core::signals::Deadline) bounds its wait too). A `max` past the
    /// clock's range (e.g. [`Duration::MAX`]) is no limit.
    pub fn max_wait(mut self, max: Duration) -> Self {
        self.max_wait = Some(max);
        self
    }

    /// Names each request's key instead of its [`AccountId`] extension.
    pub fn key_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<AccountId> + Send + Sync + 'static,
    {
        self.key_fn = Some(Arc::new(f));
        self
    }

    /// Keeps the limiter's state in `backend` (default [`InProcess`]).
    pub fn backend<B2: Backend>(self, backend: B2) -> Builder<B2> {
        Builder {
            quota: self.quota,
            classes: self.classes,
            cooldown: self.cooldown,
            adaptive: self.adaptive,
            mode: self.mode,
            max_queue: self.max_queue,
            max_wait: self.max_wait,
            key_fn: self.key_fn,
            backend,
        }
    }

    /// Checks the configuration and builds the layer.
    pub fn build(self) -> Result<GcraLayer<Bk>, ConfigError> {
        self.quota.validate_as("quota")?;
        for (_, quota) in &self.classes {
            quota.validate_as("class_quota")?;
        }
        self.cooldown.validate()?;
        if let Some(adaptive) = &self.adaptive {
            adaptive.validate()?;
        }
        if self.max_queue == Some(0) {
            return Err(ConfigError::new("layer", "max_queue", "must be at least 1"));
        }
        let shared = Arc::new(Shared {
            backend: self.backend,
            quota: QuotaCell::new(self.quota),
            classes: self
                .classes
                .into_iter()
                .map(|(k, q)| (k, QuotaCell::new(q)))
                .collect(),
            cooldown: self.cooldown,
            adaptive: self.adaptive,
            mode: self.mode,
            max_queue: self.max_queue,
            max_wait: self.max_wait,
            key_fn: self.key_fn,
            queues: Arc::new(Queues::default()),
            epoch: AtomicU64::new(0),
            report_success: AtomicBool::new(false),
            pauses: LocalPauses::default(),
        });
        Ok(GcraLayer {
            lanes: Arc::new(Lanes::new(Arc::clone(&shared))),
            shared,
        })
    }
}

/// Applies [`Gcra`] pacing to a service. See the [crate docs](crate).
///
/// # Clone
///
/// Clones of the layer, every service it makes and their clones share one limiter (quotas,
/// queues, cooldowns, adaptive state, backend) through an `Arc`: cloning never creates a second
/// quota.
pub struct GcraLayer<Bk = InProcess> {
    shared: Arc<Shared<Bk>>,
    lanes: Arc<Lanes<Bk>>,
}

impl GcraLayer<InProcess> {
    /// A builder for `quota` per account, in process.
    pub fn builder(quota: Quota) -> Builder<InProcess> {
        Builder {
            quota,
            classes: Vec::new(),
            cooldown: Cooldown::default(),
            adaptive: None,
            mode: Mode::Wait,
            max_queue: None,

            max_wait: None,
            key_fn: None,
            backend: InProcess::new(),
        }
    }

    /// `quota` per account, waiting mode, default cooldown, in process.
    pub fn new(quota: Quota) -> Result<Self, ConfigError> {
        GcraLayer::builder(quota).build()
    }
}

impl<Bk> GcraLayer<Bk> {
    /// A handle to read and change the limiter at run time.
    pub fn handle(&self) -> GcraHandle<Bk> {
        GcraHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<Bk> Clone for GcraLayer<Bk> {
    fn clone(&self) -> Self {
        GcraLayer {
            shared: Arc::clone(&self.shared),
            lanes: Arc::clone(&self.lanes),
        }
    }
}

impl<Bk: fmt::Debug> fmt::Debug for GcraLayer<Bk> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcraLayer")
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, Bk> Layer<S> for GcraLayer<Bk> {
    type Service = Gcra<S, Bk>;

    fn layer(&self, inner: S) -> Self::Service {
        Gcra::from_lanes(inner, Arc::clone(&self.lanes))
    }
}

/// Reads and changes a limiter at run time: its quotas, and what waits in it.
///
/// # Clone
///
/// Clones control the same limiter as the layer they came from.
pub struct GcraHandle<Bk = InProcess> {
    shared: Arc<Shared<Bk>>,
}

impl<Bk> Clone for GcraHandle<Bk> {
    fn clone(&self) -> Self {
        GcraHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<Bk: fmt::Debug> fmt::Debug for GcraHandle<Bk> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcraHandle")
            .field("shared", &self.shared)
            .finish()
    }
}

impl<Bk> GcraHandle<Bk> {
    /// The account quota (with adaptive mode: the ceiling).
    pub fn quota(&self) -> Quota {
        self.shared.quota.get()
    }

    /// Replaces the account quota. Waiting requests ask again at once under the new quota;
    /// each key's debt (requests admitted and not yet paid off) carries over in emission
    /// intervals.
    pub fn set_quota(&self, quota: Quota) -> Result<(), ConfigError> {
        quota.validate_as("quota")?;
        self.shared.quota.set(quota);
        self.changed();
        Ok(())
    }

    /// The quota of an endpoint class, if the layer was built with one.
    pub fn class_quota(&self, class: RequestKind) -> Option<Quota> {
        self.shared
            .classes
            .iter()
            .find(|(k, _)| *k == class)
            .map(|(_, c)| c.get())
    }

    /// Replaces the quota of an endpoint class the layer was built with.
    pub fn set_class_quota(&self, class: RequestKind, quota: Quota) -> Result<(), ConfigError> {
        quota.validate_as("class_quota")?;
        let Some((_, cell)) = self.shared.classes.iter().find(|(k, _)| *k == class) else {
            return Err(ConfigError::new(
                "class_quota",
                "class",
                "has no quota of its own: add it with Builder::class_quota",
            ));
        };
        cell.set(quota);
        self.changed();
        Ok(())
    }

    /// Requests waiting over all keys: those [`Builder::max_queue`] counts (not those whose
    /// first ask of a remote store is on its way), as the queue-depth gauge shows them.
    pub fn waiting(&self) -> usize {
        self.shared.queues.waiting()
    }

    /// Requests waiting for one account's quota (`None`: the shared key), counted as
    /// [`waiting`](Self::waiting) counts them.
    pub fn queue_depth(&self, account: Option<&AccountId>) -> usize {
        self.shared
            .queues
            .depth(&BucketKey::account(account.cloned()))
    }

    /// Bytes the queues' ring buffers hold now (each waiter's record is 24 bytes).
    pub fn queue_bytes(&self) -> usize {
        self.shared.queues.reserved_bytes()
    }

    /// The backend.
    pub fn backend(&self) -> &Bk {
        &self.shared.backend
    }

    /// The policy the backend is asked to enforce for `key` now.
    pub fn policy(&self, key: &BucketKey) -> Policy {
        self.shared.policy_for(key)
    }

    fn changed(&self) {
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        self.shared.queues.wake_heads();
    }
}
