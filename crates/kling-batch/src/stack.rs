//! The client stack a run sends through: kling-tower's [`KlingLayer`] over an HTTPS hyper-util
//! client, with a [`TallyLayer`] counting logical calls and an [`AttemptTallyLayer`] counting
//! attempts.
//!
//! ```text
//! Tally (logical calls)
//!   Kling: metrics → drain → spend guard → retry → task slots → GCRA → auth → timeout → classify → base URL
//!     AttemptTally (attempts sent; each answer's code read as the classify step above reads the body)
//!       hyper-util client (rustls, ring; plain http for the mock)
//! ```
//!
//! There is one classify step, the stack's: a second one under it would turn every error
//! it passes up (a proxy's page, a body over the preset's `max_body_bytes`) into a transport
//! failure after sending, which the retry layer must treat as a create of unknown outcome.
//!
//! # A queue, not a call
//!
//! Every job of a batch is queued at once, and a create waits in the task-slots layer until a
//! slot is free: on the Free tier's one slot, behind tasks of 15 minutes or more, that is far
//! longer than the preset's 10-minute retry deadline (`retry_deadline_secs`), and a create
//! whose wait outlasts the deadline is refused before it is sent. So a batch's stack waits
//! at least [`QUEUE_DEADLINE`] (48 hours of API time) per call, however the configuration set
//! it; a longer deadline is kept. Each call's attempts are still bounded by the preset's
//! `retry_max_attempts`.
//!
//! The account's limits live in this process ([`Stack::new`]) or, with feature `redis`, in a
//! Redis every run of the account shares (`Stack::shared`): several `kling-batch` runs, or a
//! run beside a service, then never together exceed the account's slots or rate.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_concurrency::{Reconcile, Reconciled};
use kling_core::{BoxError, TaskReport};
use kling_metrics::{Monitor, Snapshot};
use kling_tower::client::{HttpsClient, https_client_with_connect_timeout};
use kling_tower::{
    Credentials, DrainHandle, FollowPolicy, Follower, KlingBuilder, KlingLayer, StackConfig,
};
use tower::Layer;
use tower::util::BoxCloneSyncService;

use crate::error::SetupError;
use crate::journal::ApiOrigin;
use crate::tally::{AttemptTally, AttemptTallyLayer, Counts, Tally, TallyLayer};

/// The client under the stack: each attempt is counted by its Kling code.
pub type Client = AttemptTally<HttpsClient>;

/// The kling-tower stack over [`Client`], wherever its limits live.
pub type KlingService = BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError>;

/// The service a run sends every request through.
pub type BatchService = Tally<KlingService>;

/// Where the account's limits live: the layer of one backend or the other.
#[derive(Clone, Debug)]
enum Limits {
    InProcess(KlingLayer),
    #[cfg(feature = "redis")]
    Redis(KlingLayer<kling_tower::backends::Redis>),
}

/// Evaluates `$body` with `$layer` bound to the stack's [`KlingLayer`], whichever its backend.
macro_rules! with_layer {
    ($limits:expr, $layer:ident => $body:expr) => {
        match $limits {
            Limits::InProcess($layer) => $body,
            #[cfg(feature = "redis")]
            Limits::Redis($layer) => $body,
        }
    };
}

/// The stack, its service and its counters.
///
/// # Clone
///
/// Clones share the stack's limits (slots, rate, retry budget) and the counters.
#[derive(Clone, Debug)]
pub struct Stack {
    limits: Limits,
    /// The API the stack sends to: its base URL as a journal records it.
    base_url: ApiOrigin,
    service: BatchService,
    calls: Arc<Counts>,
    attempts: Arc<Counts>,
}

/// The shortest retry deadline of a batch's calls, in API time: long enough for a job to wait
/// its turn behind a queue of long tasks (see [the module docs](self#a-queue-not-a-call)).
pub const QUEUE_DEADLINE: Duration = Duration::from_secs(48 * 3600);

/// `config` with a retry deadline of at least [`QUEUE_DEADLINE`].
///
/// ```
/// use std::time::Duration;
/// use kling_batch::stack::{QUEUE_DEADLINE, queue_config};
/// use kling_tower::{StackConfig, Tier};
///
/// let config = queue_config(StackConfig::preset(Tier::Free).speed(60.0));
/// assert_eq!(config.retry_deadline_duration(), QUEUE_DEADLINE / 60);
/// ```
pub fn queue_config(config: StackConfig) -> StackConfig {
    if config.retry_deadline_duration() < config.scaled(QUEUE_DEADLINE) {
        config.retry_deadline(QUEUE_DEADLINE)
    } else {
        config
    }
}

fn builder(config: StackConfig, credentials: Credentials, base_url: &str) -> KlingBuilder {
    KlingLayer::builder(queue_config(config), credentials).base_url(base_url)
}

fn setup_error(e: &kling_tower::error::ConfigError) -> SetupError {
    SetupError::new(e.field().to_owned(), e.to_string())
}

/// The API of `base_url`, which the stack's base URL layer took: refused (not quoted, as the
/// layer quotes none) if a journal cannot record it, which the layer's checks leave none.
fn api_origin(base_url: &str) -> Result<ApiOrigin, SetupError> {
    ApiOrigin::parse(base_url).ok_or_else(|| {
        SetupError::new(
            "base_url",
            "is not an http:// or https:// URL with a host and no `@`, and is not quoted",
        )
    })
}

impl Stack {
    /// Builds the stack of `config` with `credentials` against `base_url`, its limits in this
    /// process, and its retry deadline at least [`QUEUE_DEADLINE`] ([`queue_config`]).
    pub fn new(
        config: StackConfig,
        credentials: Credentials,
        base_url: &str,
    ) -> Result<Stack, SetupError> {
        let layer = builder(config, credentials, base_url)
            .build()
            .map_err(|e| setup_error(&e))?;
        Stack::assemble(Limits::InProcess(layer), api_origin(base_url)?)
    }

    /// [`Stack::new`] with the account's limits (slots, rate, halts, lowered capacities) in the
    /// Redis of `connection`, shared with every other stack of the account on it. Feature
    /// `redis`.
    #[cfg(feature = "redis")]
    pub fn shared(
        config: StackConfig,
        credentials: Credentials,
        base_url: &str,
        connection: kling_tower::redis::Connection,
    ) -> Result<Stack, SetupError> {
        let layer = builder(config, credentials, base_url)
            .shared(connection)
            .build()
            .map_err(|e| setup_error(&e))?;
        Stack::assemble(Limits::Redis(layer), api_origin(base_url)?)
    }

    fn assemble(limits: Limits, base_url: ApiOrigin) -> Result<Stack, SetupError> {
        kling_tower::client::install_ring_provider();
        // Connections give up opening well before an attempt times out (at `--speed`, that is
        // soon): one that never opened was never sent.
        let connect = with_layer!(&limits, layer => layer.config().connect_timeout_duration());
        let client = https_client_with_connect_timeout(connect)
            .map_err(|e| SetupError::new("tls", e.to_string()))?;
        let limit = with_layer!(&limits, layer => layer.config().body_limit());
        let attempts = AttemptTallyLayer::new(limit);
        let calls = TallyLayer::new();
        let bottom = attempts.layer(client);
        let kling = with_layer!(&limits, layer => KlingService::new(layer.layer(bottom)));
        Ok(Stack {
            service: calls.layer(kling),
            limits,
            base_url,
            calls: calls.counts(),
            attempts: attempts.counts(),
        })
    }

    /// The API the stack sends every request to: the base URL it was built with, as a journal
    /// records it (scheme, host, port and path; see [`ApiOrigin`]).
    /// [`Engine::run`](crate::run::Engine::run) binds its journal to it.
    pub fn base_url(&self) -> &ApiOrigin {
        &self.base_url
    }

    /// The monitor every layer reports to.
    pub fn monitor(&self) -> &Monitor {
        with_layer!(&self.limits, layer => layer.monitor())
    }

    /// Whether these credentials may list new-style tasks (`POST /tasks`): an API key may,
    /// the access key pair may not (Kling takes only an API key there, and the auth layer
    /// refuses such a request before sending it).
    pub fn lists_new_style_tasks(&self) -> bool {
        let mut list = Request::new(());
        *list.method_mut() = http::Method::POST;
        *list.uri_mut() = http::Uri::from_static("/tasks");
        with_layer!(&self.limits, layer => layer.auth().check_endpoint(&list).is_ok())
    }

    /// Usage now: rate, slots, 429s, tasks.
    pub fn snapshot(&self) -> Snapshot {
        with_layer!(&self.limits, layer => layer.snapshot())
    }

    /// `duration` of API time in real time, at the configured speed.
    pub fn scaled(&self, duration: Duration) -> Duration {
        with_layer!(&self.limits, layer => layer.config().scaled(duration))
    }

    /// The drain: closing it refuses new creates.
    pub fn drain_handle(&self) -> DrainHandle {
        with_layer!(&self.limits, layer => layer.drain_handle())
    }

    /// A task follower querying through this stack's service.
    pub fn follower(
        &self,
        policy: FollowPolicy,
    ) -> Result<Follower<BatchService>, kling_tower::error::ConfigError> {
        with_layer!(&self.limits, layer => layer.follower(self.service(), policy))
    }

    /// Lists the account's unfinished tasks through the stack and adopts their slots.
    pub async fn reconcile(&self, plan: &Reconcile) -> Result<Reconciled, BoxError> {
        let mut service = self.service();
        with_layer!(&self.limits, layer => layer.slots().reconcile(&mut service, plan).await)
    }

    /// Hands a verified callback body to the stack (frees the task's slots, settles its cost).
    pub async fn on_callback(&self, payload: &[u8]) -> Result<Option<TaskReport>, BoxError> {
        with_layer!(&self.limits, layer => layer.on_callback(payload).await)
    }

    /// A clone of the service.
    pub fn service(&self) -> BatchService {
        self.service.clone()
    }

    /// Logical calls made through the stack (creates, queries, lookups, lists).
    pub fn calls(&self) -> &Counts {
        &self.calls
    }

    /// Attempts sent to the server, by Kling code (retries included).
    pub fn attempts(&self) -> &Counts {
        &self.attempts
    }
}
