//! [`GatewayLayer`]: several Kling accounts in one process — one service keyed by
//! [`AccountId`], each account with its own preset and credentials.
//!
//! Each request names its account with an [`AccountId`] extension (a gateway sets it from
//! whatever identifies the internal user); the gateway hands it to that account's
//! [`Kling`] stack. Every account has its own numbers (a Free account's one slot and 10
//! requests a minute beside a Pro account's 5 and 60), its own credentials, token cache, retry
//! budget, spend ledger and metrics monitor; all of them share the one HTTP client (and its
//! connection pool) the layer is applied to. A request naming no account, or an unknown one,
//! fails with [`UnknownAccount`] and is never sent.
//!
//! A fleet of gateways shares each account's limits through Redis (feature `redis`): build
//! every account's stack with `KlingBuilder::shared`, and the
//! gateway is a `GatewayLayer<backends::Redis>`, each account keyed by its [`AccountId`]. Every
//! gateway of the fleet must then give an account the same name: two names are two sets of
//! limits in Redis.
//!
//! # One entry per Kling account
//!
//! An entry's name is its stack's [`AccountId`]: the stack's limits count under it, its
//! snapshot and metrics show it, and its [follower](crate::KlingLayer::follower)'s queries carry
//! it, so the gateway routes them back to that stack. A different
//! [`KlingBuilder::account`](crate::KlingBuilder::account) set on the entry's builder is
//! refused (`accounts.team-a.account`), not silently replaced.
//!
//! Kling counts slots for the whole account, whatever key a request is signed with. Two
//! entries on one Kling account would each admit the account's whole slots and rate, and
//! Kling would answer the excess with 1303 and 1302, so [`GatewayBuilder::build`] refuses two
//! entries whose credentials derive the same account id
//! ([`Credentials::account_id`](crate::Credentials::account_id): the same API key, or the same
//! access key) with `accounts.team-b uses the same credentials as accounts.team-a`. Route such
//! users to one entry. Different keys of one account (two API keys, or an API key and an
//! access key) derive different ids and cannot be told apart here: give them one entry too.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use kling_core::{AccountId, Outcome};
//! use kling_mock::{MockConfig, MockKling, Preset};
//! use kling_tower::gateway::GatewayLayer;
//! use kling_tower::{Credentials, KlingLayer, StackConfig, Tier};
//! use tower::{Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), kling_core::BoxError> {
//! let gateway = GatewayLayer::builder()
//!     .account(
//!         "team-a",
//!         KlingLayer::builder(StackConfig::preset(Tier::Pro), Credentials::api_key("key-a")?),
//!     )
//!     .account(
//!         "team-b",
//!         KlingLayer::builder(StackConfig::preset(Tier::Free), Credentials::api_key("key-b")?),
//!     )
//!     .build()?;
//! let mock = MockKling::new(
//!     MockConfig::preset(Preset::Pro).api_key_for("key-a", "a").api_key_for("key-b", "b"),
//! )?;
//! let service = gateway.layer(mock);
//!
//! let mut create = http::Request::post("/v1/videos/text2video")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from(r#"{"prompt":"a cat"}"#)))?;
//! create.extensions_mut().insert(AccountId::new("team-b"));
//! let response = service.oneshot(create).await?;
//! assert!(Outcome::of(&response).unwrap().is_success());
//!
//! let team_b = gateway.get(&AccountId::new("team-b")).unwrap();
//! assert_eq!(team_b.snapshot().pool("video").unwrap().capacity, 1); // the Free tier's slot
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use kling_core::{AccountId, BoxError};
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower_layer::Layer;
use tower_service::Service;

use crate::backends::{InProcess, StackBackends};
use crate::error::{ConfigError, UnknownAccount};
use crate::stack::{Kling, KlingBuilder, KlingLayer};

/// Collects the accounts of a [`GatewayLayer`]. Every account's stack keeps its limits where
/// `B` says ([`StackBackends`]): in this process by default, or in Redis for a fleet of
/// gateways (each account's builder made with `KlingBuilder::shared`, feature `redis`).
#[must_use]
pub struct GatewayBuilder<B = InProcess> {
    accounts: Vec<(AccountId, KlingBuilder<B>)>,
}

impl<B> Default for GatewayBuilder<B> {
    fn default() -> Self {
        GatewayBuilder {
            accounts: Vec::new(),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for GatewayBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayBuilder")
            .field("accounts", &self.accounts)
            .finish()
    }
}

impl<B: StackBackends> GatewayBuilder<B> {
    /// Adds an account: requests carrying `account` go through the stack `stack` builds. The
    /// stack's limits, snapshot and follower count under `account`; a different
    /// [`KlingBuilder::account`] set on `stack` is refused by [`build`](Self::build) (see
    /// [one entry per Kling account](self#one-entry-per-kling-account)).
    pub fn account(mut self, account: impl Into<AccountId>, stack: KlingBuilder<B>) -> Self {
        self.accounts.push((account.into(), stack));
        self
    }

    /// Builds every account's stack; an error names the account and the field
    /// (`accounts.team-a.burst`). Refuses no account, an account added twice, a stack whose
    /// own [`KlingBuilder::account`] is not its entry's name (`accounts.team-a.account`: the
    /// gateway routes by that name, so the stack's limits must count under it), and two accounts
    /// whose credentials derive the same account id, naming the later one
    /// (`accounts.team-b`, "uses the same credentials as accounts.team-a"): they would be one
    /// Kling account with two sets of limits.
    pub fn build(self) -> Result<GatewayLayer<B>, ConfigError> {
        if self.accounts.is_empty() {
            return Err(ConfigError::new(
                "accounts",
                "must name at least one account",
            ));
        }
        let mut stacks = BTreeMap::new();
        // The account id each entry's credentials derive, and the entry that has it.
        let mut kling_accounts: BTreeMap<AccountId, AccountId> = BTreeMap::new();
        for (account, builder) in self.accounts {
            let field = |e: ConfigError| {
                let name = format!("accounts.{account}.{}", e.field());
                e.renamed(name)
            };
            if let Some(set) = builder.account_set()
                && *set != account
            {
                return Err(ConfigError::new(
                    format!("accounts.{account}.account"),
                    format!("is {set}, but the gateway counts this stack's limits under {account}"),
                ));
            }
            let layer = builder.account(account.clone()).build().map_err(field)?;
            // The auth layer's credentials: the ones the stack signs with, also when the
            // builder was given its own `AuthLayer`.
            let kling_account = layer.auth().account_id().clone();
            if let Some(first) = kling_accounts.get(&kling_account)
                && *first != account
            {
                return Err(ConfigError::new(
                    format!("accounts.{account}"),
                    format!("uses the same credentials as accounts.{first}"),
                ));
            }
            kling_accounts.insert(kling_account, account.clone());
            if stacks.insert(account.clone(), layer).is_some() {
                return Err(ConfigError::new(
                    format!("accounts.{account}"),
                    "is configured twice",
                ));
            }
        }
        Ok(GatewayLayer {
            stacks: Arc::new(stacks),
        })
    }
}

/// One [`KlingLayer`] per account, applied to one client. See the [module docs](self).
///
/// # Clone
///
/// Clones share every account's stack (limits, handles, monitors).
pub struct GatewayLayer<B: StackBackends = InProcess> {
    stacks: Arc<BTreeMap<AccountId, KlingLayer<B>>>,
}

impl<B: StackBackends> Clone for GatewayLayer<B> {
    fn clone(&self) -> Self {
        GatewayLayer {
            stacks: Arc::clone(&self.stacks),
        }
    }
}

impl<B: StackBackends> fmt::Debug for GatewayLayer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayLayer")
            .field("stacks", &self.stacks)
            .finish()
    }
}

impl<B: StackBackends> GatewayLayer<B> {
    /// A builder to add accounts to (the backends `B` follow from the accounts' builders).
    pub fn builder() -> GatewayBuilder<B> {
        GatewayBuilder::default()
    }

    /// One account's stack (its handles: slots, rate limit, snapshot, drain, callbacks).
    pub fn get(&self, account: &AccountId) -> Option<&KlingLayer<B>> {
        self.stacks.get(account)
    }

    /// Every account and its stack, ordered by account.
    pub fn accounts(&self) -> impl Iterator<Item = (&AccountId, &KlingLayer<B>)> {
        self.stacks.iter()
    }

    /// Drains every account: stops admitting creates everywhere, then waits until nothing is
    /// in flight in any account.
    pub async fn drain(&self) {
        for stack in self.stacks.values() {
            stack.drain_handle().close();
        }
        for stack in self.stacks.values() {
            stack.drain().await;
        }
    }
}

impl<S: Clone, B: StackBackends> Layer<S> for GatewayLayer<B> {
    type Service = Gateway<S, B>;

    fn layer(&self, client: S) -> Gateway<S, B> {
        let stacks = self
            .stacks
            .iter()
            .map(|(account, layer)| (account.clone(), layer.layer(client.clone())))
            .collect();
        Gateway {
            stacks: Arc::new(stacks),
        }
    }
}

/// Routes each request to its account's [`Kling`] stack. See the [module docs](self).
///
/// Always ready: each call waits for readiness of a clone of its account's stack (the stacks
/// themselves are always ready; their limits wait inside the response future).
///
/// # Clone
///
/// Clones share the stacks.
pub struct Gateway<S, B: StackBackends = InProcess> {
    stacks: Arc<BTreeMap<AccountId, Kling<S, B>>>,
}

impl<S, B: StackBackends> Clone for Gateway<S, B> {
    fn clone(&self) -> Self {
        Gateway {
            stacks: self.stacks.clone(),
        }
    }
}

impl<S, B: StackBackends> fmt::Debug for Gateway<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("accounts", &self.stacks.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<S, B: StackBackends> Service<Request<Full<Bytes>>> for Gateway<S, B>
where
    Kling<S, B>:
        Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError> + Clone,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = ResponseFuture<Kling<S, B>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        let account = AccountId::of(&request);
        match account.and_then(|a| self.stacks.get(a)) {
            Some(stack) => ResponseFuture {
                state: State::Routed {
                    future: Oneshot::new(stack.clone(), request),
                },
            },
            None => ResponseFuture {
                state: State::Unknown {
                    error: Some(UnknownAccount::new(account.cloned())),
                },
            },
        }
    }
}

pin_project! {
    /// The [`Gateway`] response future.
    pub struct ResponseFuture<K>
    where
        K: Service<Request<Full<Bytes>>>,
    {
        #[pin]
        state: State<K>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<K>
    where
        K: Service<Request<Full<Bytes>>>,
    {
        Routed { #[pin] future: Oneshot<K, Request<Full<Bytes>>> },
        Unknown { error: Option<UnknownAccount> },
    }
}

impl<K: Service<Request<Full<Bytes>>>> fmt::Debug for ResponseFuture<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<K> Future for ResponseFuture<K>
where
    K: Service<Request<Full<Bytes>>, Error = BoxError>,
{
    type Output = Result<K::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Routed { future } => future.poll(cx),
            StateProj::Unknown { error } => Poll::Ready(Err(match error.take() {
                Some(e) => Box::new(e),
                None => "gateway future polled after completion".into(),
            })),
        }
    }
}
