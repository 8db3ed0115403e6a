//! The client stack a run sends through: kling-tower's [`KlingLayer`] over an HTTPS hyper-util
//! client, with two [`TallyLayer`]s counting logical calls and attempts.
//!
//! ```text
//! Tally (logical calls)
//!   Kling: metrics → drain → spend guard → retry → task slots → GCRA → auth → timeout → classify → base URL
//!     Tally (attempts sent, by Kling code)
//!       classify (so the attempt's code can be counted)
//!         hyper-util client (rustls, ring; plain http for the mock)
//! ```

use std::sync::Arc;

use kling_core::{Classify, ClassifyLayer};
use kling_tower::client::{HttpsClient, https_client};
use kling_tower::{Credentials, Kling, KlingLayer, StackConfig};
use tower::Layer;

use crate::error::SetupError;
use crate::tally::{Counts, Tally, TallyLayer};

/// The client under the stack: each attempt is counted by its Kling code.
pub type Client = Tally<Classify<HttpsClient>>;

/// The service a run sends every request through.
pub type BatchService = Tally<Kling<Client>>;

/// The stack, its service and its counters.
///
/// # Clone
///
/// Clones share the stack's limits (slots, rate, retry budget) and the counters.
#[derive(Clone, Debug)]
pub struct Stack {
    layer: KlingLayer,
    service: BatchService,
    client: HttpsClient,
    calls: Arc<Counts>,
    attempts: Arc<Counts>,
}

impl Stack {
    /// Builds the stack of `config` with `credentials` against `base_url`.
    pub fn new(
        config: StackConfig,
        credentials: Credentials,
        base_url: &str,
    ) -> Result<Stack, SetupError> {
        let layer = KlingLayer::builder(config, credentials)
            .base_url(base_url)
            .build()
            .map_err(|e| SetupError::new(e.field().to_owned(), e.to_string()))?;
        kling_tower::client::install_ring_provider();
        let client = https_client().map_err(|e| SetupError::new("tls", e.to_string()))?;
        let attempts = TallyLayer::new();
        let calls = TallyLayer::new();
        let bottom = attempts.layer(ClassifyLayer::new().layer(client.clone()));
        let service = calls.layer(layer.layer(bottom));
        Ok(Stack {
            layer,
            service,
            client,
            calls: calls.counts(),
            attempts: attempts.counts(),
        })
    }

    /// The kling-tower layer: slots handle, monitor, drain, follow policy.
    pub fn layer(&self) -> &KlingLayer {
        &self.layer
    }

    /// A clone of the service.
    pub fn service(&self) -> BatchService {
        self.service.clone()
    }

    /// The bare HTTP client (for downloads, which go to result URLs, not to the API).
    pub fn client(&self) -> &HttpsClient {
        &self.client
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
