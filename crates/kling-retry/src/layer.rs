//! [`RetryLayer`] and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::backoff::Backoff;
use crate::budget::RetryBudget;
use crate::error::ConfigError;
use crate::policy::{KlingPolicy, Policy};
use crate::rng::{RandomSource, SplitMix};
use crate::service::Retry;

/// The default attempt limit: the first try and four retries.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// The default total deadline of one call, across attempts and every wait below.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10 * 60);

/// The configuration every service of one layer shares.
pub(crate) struct Shared<P> {
    pub(crate) policy: P,
    pub(crate) backoff: Backoff,
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Option<Duration>,
    pub(crate) budget: RetryBudget,
    pub(crate) rng: Arc<dyn RandomSource>,
    /// The source of generated external ids: never [`RetryLayerBuilder::seed`]'s, so two runs
    /// (or processes) seeded alike do not give their creates one another's ids.
    pub(crate) ids: Arc<dyn RandomSource>,
    pub(crate) generate_external_ids: bool,
}

impl<P: fmt::Debug> fmt::Debug for Shared<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("policy", &self.policy)
            .field("backoff", &self.backoff)
            .field("max_attempts", &self.max_attempts)
            .field("deadline", &self.deadline)
            .field("budget", &self.budget)
            .field("generate_external_ids", &self.generate_external_ids)
            .finish_non_exhaustive()
    }
}

/// Applies [`Retry`] to a service. See the [crate docs](crate).
///
/// # Clone
///
/// Clones share one configuration, one [`RetryBudget`] and one random source (an `Arc`), and so
/// do all the services the layer makes.
pub struct RetryLayer<P = KlingPolicy> {
    shared: Arc<Shared<P>>,
}

impl RetryLayer {
    /// A layer with Kling's rules and the defaults: [`DEFAULT_MAX_ATTEMPTS`] attempts, a
    /// [`DEFAULT_DEADLINE`], [`Backoff::default`], [`RetryBudget::default`], jitter from
    /// [`SplitMix::from_entropy`], no generated external ids.
    pub fn new() -> Self {
        RetryLayer::builder()
            .build()
            .expect("the defaults are valid")
    }

    /// A builder starting from the defaults.
    pub fn builder() -> RetryLayerBuilder {
        RetryLayerBuilder {
            policy: KlingPolicy,
            backoff: Backoff::default(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            deadline: Some(DEFAULT_DEADLINE),
            budget: None,
            rng: None,
            ids: None,
            generate_external_ids: false,
        }
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        RetryLayer::new()
    }
}

impl<P> RetryLayer<P> {
    /// The budget the layer's services share.
    pub fn budget(&self) -> &RetryBudget {
        &self.shared.budget
    }
}

impl<P> Clone for RetryLayer<P> {
    fn clone(&self) -> Self {
        RetryLayer {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for RetryLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RetryLayer").field(&self.shared).finish()
    }
}

impl<S, P> Layer<S> for RetryLayer<P> {
    type Service = Retry<S, P>;

    fn layer(&self, inner: S) -> Retry<S, P> {
        Retry::from_shared(inner, Arc::clone(&self.shared))
    }
}

/// Builds a [`RetryLayer`]; [`build`](Self::build) checks every value.
#[must_use]
pub struct RetryLayerBuilder<P = KlingPolicy> {
    policy: P,
    backoff: Backoff,
    max_attempts: u32,
    deadline: Option<Duration>,
    budget: Option<RetryBudget>,
    rng: Option<Arc<dyn RandomSource>>,
    ids: Option<Arc<dyn RandomSource>>,
    generate_external_ids: bool,
}

impl<P> RetryLayerBuilder<P> {
    /// Uses another policy (see [`Policy`]).
    pub fn policy<Q: Policy>(self, policy: Q) -> RetryLayerBuilder<Q> {
        RetryLayerBuilder {
            policy,
            backoff: self.backoff,
            max_attempts: self.max_attempts,
            deadline: self.deadline,
            budget: self.budget,
            rng: self.rng,
            ids: self.ids,
            generate_external_ids: self.generate_external_ids,
        }
    }

    /// Sets the most requests one call sends, the first included (at least 1; 1 = no retry
    /// but the two uncounted ones below). Lookups by external id count; a slot-gated retry (a `1303` that a task-slots layer
    /// below holds until a slot frees, [`SlotGated`](kling_core::signals::SlotGated)) and the
    /// one resend of a refused token do not: they wait rather than hammer the API, and the
    /// deadline bounds them. Nor, in a call with a deadline, does a throttled retry (a `1302`,
    /// a 429 page): it says the account went too fast, not that this call fails, and the
    /// backoff, the budget and the deadline bound those (without a deadline they count).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets the total time one call may take, across attempts and every wait in the layers
    /// below (they receive it as [`kling_core::signals::Deadline`]). A request that already
    /// carries an earlier `Deadline` keeps it. The waits below honour it, and a retry or lookup
    /// still out at it, or one the service below is still not ready to take, is given up; the
    /// first attempt is bounded by a timeout under this layer only (none is armed for it here).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Removes the layer's own deadline (a `Deadline` a request carries is still honoured).
    pub fn no_deadline(mut self) -> Self {
        self.deadline = None;
        self
    }

    /// Sets the delay rules.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the retry budget (pass a clone of one budget to several layers to share it).
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Sets the random source of the jitter and of generated external ids (a recorded
    /// sequence replays both; ids repeated across runs or processes are the caller's to avoid).
    pub fn rng(mut self, rng: impl RandomSource) -> Self {
        let rng: Arc<dyn RandomSource> = Arc::new(rng);
        self.ids = Some(Arc::clone(&rng));
        self.rng = Some(rng);
        self
    }

    /// Seeds the jitter with [`SplitMix::seeded`], for exact tests and reproducible runs.
    /// Generated external ids stay drawn from the process's entropy: an id is the create's
    /// name at Kling for the whole account, and two runs or processes seeded alike would
    /// otherwise give their creates the same ids (a 1201, or a lookup that finds the other's
    /// task and returns it as this create's).
    pub fn seed(mut self, seed: u64) -> Self {
        self.rng = Some(Arc::new(SplitMix::seeded(seed)));
        self
    }

    /// Adds a generated `external_task_id` (`kr-` and 32 hex digits; `external_id` on new-style
    /// paths) to every create that has none, so a create whose outcome is unknown can be looked
    /// up and safely sent again. Off by default: the id becomes part of the caller's task.
    pub fn generate_external_ids(mut self, on: bool) -> Self {
        self.generate_external_ids = on;
        self
    }

    /// The layer, or the first invalid field.
    pub fn build(self) -> Result<RetryLayer<P>, ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::new("max_attempts", "must be at least 1"));
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new("deadline", "must be positive"));
        }
        self.backoff.validate()?;
        Ok(RetryLayer {
            shared: Arc::new(Shared {
                policy: self.policy,
                backoff: self.backoff,
                max_attempts: self.max_attempts,
                deadline: self.deadline,
                budget: self.budget.unwrap_or_default(),
                rng: self
                    .rng
                    .unwrap_or_else(|| Arc::new(SplitMix::from_entropy())),
                ids: self
                    .ids
                    .unwrap_or_else(|| Arc::new(SplitMix::from_entropy())),
                generate_external_ids: self.generate_external_ids,
            }),
        })
    }
}

impl<P: fmt::Debug> fmt::Debug for RetryLayerBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayerBuilder")
            .field("policy", &self.policy)
            .field("backoff", &self.backoff)
            .field("max_attempts", &self.max_attempts)
            .field("deadline", &self.deadline)
            .field("budget", &self.budget)
            .field("generate_external_ids", &self.generate_external_ids)
            .finish_non_exhaustive()
    }
}
