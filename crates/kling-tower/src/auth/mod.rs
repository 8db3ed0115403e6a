//! [`AuthLayer`]: sets the `Authorization` header from an API key, or from an access key and a
//! secret key signed into an HS256 JWT, and re-signs once on 1003/1004.
//!
//! A JWT carries `iss` = access key, `exp` = now + 1800 s and `nbf` = now − 5 s. It is cached
//! and signed again [`renew_before`](AuthLayer::renew_before) its expiry (5 minutes by
//! default). When the server still answers 1003 (not yet valid) or 1004 (expired), the layer
//! signs a fresh token and sends that attempt once more itself; the second answer is returned
//! whatever it is. The re-sent copy carries the method, URI, version, headers, body and
//! extensions of the first: the layers below read the request's signals (a metrics layer's
//! send counter, a create's send watch and halt gate, the deadline) for the resend as for the
//! first attempt, so a create whose account was halted since its slots were granted is not
//! sent again. The signals are copied without allocating when they are all the extensions
//! hold (the stack's case); other extensions are copied whole. Only a JWT keeps such a copy;
//! an API key cannot be refreshed, so its requests pass through with no copy at all.
//!
//! Under a retry layer, which keeps a copy of every request anyway, the copy here is waste:
//! with [`resend_on_refusal(false)`](AuthLayer::resend_on_refusal) (as
//! [`KlingLayer`](crate::KlingLayer) sets it) the layer keeps no copy, and on 1003/1004 only
//! drops the refused token, so the next attempt is signed afresh, and marks the response
//! [`TokenDropped`]: [`KlingPolicy`](kling_retry::KlingPolicy) then sends it again at once,
//! once per call.
//!
//! A 1003 means this machine's clock is ahead of Kling's by more than `nbf`'s margin, and a
//! token signed afresh on the same clock would be refused just the same: so a 1003 also sets
//! `nbf` [`MAX_NOT_BEFORE_SKEW`] in the past (instead of 5 s) for every token the layer signs
//! from then on, and drops a cached token signed with the narrower margin (one another request
//! signed meanwhile would be refused too). One step, not a widening by halves: an earlier `nbf`
//! only makes a token valid from further back, and each step short of the skew would fail
//! every call that carried it.
//!
//! Every request clones the `Authorization` value, and never takes a lock to do it: an API key's
//! value is built once per layer and thread lane ([`kling_core::lanes`]), each copy in bytes of its
//! own that the layer and the requests carrying that copy share (a clone is a reference count,
//! written by that lane's threads alone; the bytes are freed with the layer and the last such
//! request, never kept for the life of the process), and each thread keeps its own copy of the
//! current JWT, checked against the shared token's generation with a plain read, so the lock is
//! taken only to sign or to drop a token. A thread's copy goes with its layer: at once on the
//! thread that drops the layer, and on any other thread at its next JWT request (a thread that
//! sends none keeps the token, never the keys, until it ends); only the layer that made a copy ever
//! sends it.
//!
//! # New-style endpoints take an API key
//!
//! Kling takes only an API key on new-style endpoints (`/{product}/{model}`, `/tasks`); the
//! access key pair's JWT works on legacy ones (`/v1/...`) and on `/account/costs`, and Kling
//! answers it elsewhere with 401 code 1000. So with an access key pair the layer refuses a
//! request to a new-style endpoint itself, before a token is signed or anything is sent, with
//! [`ApiKeyRequired`] (naming the path, and the fix: an API key, or for a create a legacy
//! create path; a new-style task is queried and listed at `/tasks` alone): a request spent at
//! Kling on a certain refusal, reported as "authentication failed", would say less. The
//! endpoint is read from the recognition the stack cached, else from the method and path
//! ([`Route::of`]); an API key's requests are not looked at, and another method on `/tasks`
//! (no endpoint: the server's 404, wrong method) is sent. Below a rate limiter and
//! task slots, such a request has waited for a turn and a slot by then;
//! [`AuthLayer::check_endpoint`] is the same check for a stack's entry, before either, and
//! [`KlingLayer`](crate::KlingLayer)'s stack makes it at its drain gate (under the metrics
//! layer, which counts the refusal).
//!
//! The layer also sets the request's [`AccountId`] when it has none: for an API key,
//! `key-` and the first 12 hex digits of the key's SHA-256; for an access key, `ak-` and the
//! same of the access key's (the id is a metric label and a Redis key, and an access key is half
//! of the credential pair). Credentials never appear in `Debug` output.
//!
//! # Example
//!
//! ```
//! use kling_tower::auth::{AuthLayer, Credentials};
//!
//! let credentials = Credentials::access_key("ak-demo", "sk-demo")?;
//! assert!(!format!("{credentials:?}").contains("sk-demo"));
//! let layer = AuthLayer::new(credentials);
//! assert!(layer.account_id().as_str().starts_with("ak-"));
//! assert!(!format!("{layer:?}").contains("ak-demo"));
//! # Ok::<(), kling_tower::error::ConfigError>(())
//! ```
//!
//! # Where credentials go
//!
//! The layer sets `Authorization` on whatever request it is given; it does not know where the
//! request goes. Put a [`BaseUrlLayer`](crate::base_url::BaseUrlLayer) below it, as
//! [`KlingLayer`](crate::KlingLayer) does: that layer sends to its base URL's origin only
//! (`https://`, or plain `http://` to a loopback host) and refuses a request whose absolute URI
//! names another origin with [`OtherOrigin`](crate::base_url::OtherOrigin), before it is sent.
//! The classify step passes that refusal up as it is (its source is [`RefusedBeforeSending`]),
//! so a retry layer above returns it at once rather than trying again.
//!
//! # Position
//!
//! Below the rate limiter (each attempt it sends is paced) and above the per-attempt timeout
//! and `ClassifyLayer`, whose [`Outcome`](kling_core::Outcome) it reads.

pub mod future;
mod local;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kling_core::call_clock;
use kling_core::error::{NotSent, RefusedBeforeSending};
use kling_core::lanes::{self, LANES};
use kling_core::signals::TokenDropped;
use kling_core::{AccountId, ApiGeneration, BoxError, Recognized, RequestKind, Route};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tower_layer::Layer;
use tower_service::Service;

use crate::clock::{SystemClock, WallClock};
use crate::error::{ConfigError, SigningError};

/// How long a signed token is valid (Kling's `exp` = now + 1800 s).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(1800);
/// How far `nbf` is set in the past (Kling's `nbf` = now − 5 s), until a 1003 says the clock is
/// further ahead than that.
pub const NOT_BEFORE_SKEW: Duration = Duration::from_secs(5);
/// How far in the past `nbf` is set once a 1003 said this clock is ahead of Kling's: ten minutes
/// of clock skew, a third of the token's life.
pub const MAX_NOT_BEFORE_SKEW: Duration = Duration::from_secs(600);
/// The default margin before expiry at which a cached token is signed again.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(300);

/// Kling credentials: an API key, or a legacy access key and secret key.
///
/// `Debug` shows the kind and the derived account id, never a key.
#[derive(Clone)]
pub struct Credentials {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    ApiKey(Arc<str>),
    AccessKey { access: Arc<str>, secret: Arc<[u8]> },
}

impl Credentials {
    /// An API key, sent as `Authorization: Bearer <key>`.
    pub fn api_key(key: impl Into<String>) -> Result<Credentials, ConfigError> {
        let key = key.into();
        let key = key.trim();
        if key.is_empty() {
            return Err(ConfigError::new("api_key", "must not be empty"));
        }
        if HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
            return Err(ConfigError::new(
                "api_key",
                "must be visible ascii (it goes into a header)",
            ));
        }
        Ok(Credentials {
            kind: Kind::ApiKey(Arc::from(key)),
        })
    }

    /// A legacy access key and secret key, signed into an HS256 JWT. Whitespace around either
    /// (a line end left by a `.env` file) is not part of it.
    ///
    /// For legacy endpoints (`/v1/...`) and `/account/costs` only: new-style endpoints
    /// (`/{product}/{model}`, `/tasks`) take an API key ([`Credentials::api_key`],
    /// `KLING_API_KEY`), and [`AuthLayer`] refuses a request to one with [`ApiKeyRequired`]
    /// before sending it.
    pub fn access_key(
        access_key: impl Into<String>,
        secret_key: impl Into<String>,
    ) -> Result<Credentials, ConfigError> {
        let access = access_key.into();
        let secret = secret_key.into();
        if access.trim().is_empty() {
            return Err(ConfigError::new("access_key", "must not be empty"));
        }
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(ConfigError::new("secret_key", "must not be empty"));
        }
        if EncodingKey::from_secret(secret.as_bytes()).is_err() {
            return Err(ConfigError::new("secret_key", "is not a usable HS256 key"));
        }
        Ok(Credentials {
            kind: Kind::AccessKey {
                access: Arc::from(access.trim()),
                secret: Arc::from(secret.as_bytes()),
            },
        })
    }

    /// Reads `KLING_API_KEY`, or else `KLING_ACCESS_KEY` and `KLING_SECRET_KEY`: with an API
    /// key set, the pair is not read. A blank variable (`KLING_API_KEY=` in a `.env` file, or
    /// `${KLING_API_KEY}` of a compose file where it is unset) counts as not set, as in
    /// [`StackConfig::from_env`](crate::StackConfig::from_env). A variable read that is set to
    /// bytes that are not UTF-8 is refused, naming it (read as unset, a bad `KLING_API_KEY` was
    /// reported as not set, or passed over for the access key pair); one not read (the pair
    /// beside an API key) is left alone.
    pub fn from_env() -> Result<Credentials, ConfigError> {
        Credentials::from_os_lookup(|name| std::env::var_os(name))
    }

    /// [`from_lookup`](Self::from_lookup) over values that may not be text: each is checked
    /// when it is read, so one the credentials do not use fails nothing.
    fn from_os_lookup(
        lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Credentials, ConfigError> {
        Credentials::read(|name| match lookup(name) {
            None => Ok(None),
            Some(value) => value
                .into_string()
                .map(Some)
                .map_err(|_| ConfigError::new(name.to_owned(), "is set but is not valid UTF-8")),
        })
    }

    /// Like [`Credentials::from_env`], with variables looked up by name.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Credentials, ConfigError> {
        Credentials::read(|name| Ok(lookup(name)))
    }

    /// The credentials from variables, each looked up only if they use it: a lookup's error
    /// is the answer when that variable is the one to use.
    fn read(
        lookup: impl Fn(&str) -> Result<Option<String>, ConfigError>,
    ) -> Result<Credentials, ConfigError> {
        let set = |var: &str| Ok(lookup(var)?.filter(|value| !value.trim().is_empty()));
        if let Some(key) = set("KLING_API_KEY")? {
            return Credentials::api_key(key).map_err(|e| e.renamed("KLING_API_KEY"));
        }
        match (set("KLING_ACCESS_KEY")?, set("KLING_SECRET_KEY")?) {
            (Some(ak), Some(sk)) => Credentials::access_key(ak, sk).map_err(|e| {
                let var = if e.field() == "access_key" {
                    "KLING_ACCESS_KEY"
                } else {
                    "KLING_SECRET_KEY"
                };
                e.renamed(var)
            }),
            (Some(_), None) => Err(ConfigError::new(
                "KLING_SECRET_KEY",
                "must be set with KLING_ACCESS_KEY",
            )),
            (None, Some(_)) => Err(ConfigError::new(
                "KLING_ACCESS_KEY",
                "must be set with KLING_SECRET_KEY",
            )),
            (None, None) => Err(ConfigError::new(
                "KLING_API_KEY",
                "is not set, or blank (nor KLING_ACCESS_KEY and KLING_SECRET_KEY)",
            )),
        }
    }

    /// The account these credentials belong to: `key-` + 12 hex digits of the API key's
    /// SHA-256, or `ak-` + 12 hex digits of the access key's. Never the key itself: the id is
    /// a metric label, a Redis key and part of log lines, and an access key is half of the
    /// credential pair.
    ///
    /// Interned ([`AccountId::interned`]): every request carries it, and a copy that touches no
    /// shared reference count keeps the threads of a runtime from contending on it.
    pub fn account_id(&self) -> AccountId {
        let (prefix, key) = match &self.kind {
            Kind::ApiKey(key) => ("key-", key),
            Kind::AccessKey { access, .. } => ("ak-", access),
        };
        let digest = Sha256::digest(key.as_bytes());
        let mut id = String::with_capacity(prefix.len() + 12);
        id.push_str(prefix);
        for byte in &digest[..6] {
            id.push_str(&format!("{byte:02x}"));
        }
        AccountId::interned(&id)
    }

    /// Whether these are an access key and secret key (signed into a JWT).
    pub fn is_jwt(&self) -> bool {
        matches!(self.kind, Kind::AccessKey { .. })
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::ApiKey(_) => "api_key",
            Kind::AccessKey { .. } => "access_key",
        };
        f.debug_struct("Credentials")
            .field("kind", &kind)
            .field("account", &self.account_id().as_str())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A header to send, its token generation, and maybe the way back to its cache.
type Found = (HeaderValue, u64, Option<local::Owner>);

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    exp: u64,
    nbf: u64,
}

/// One signed token and when to sign the next.
#[derive(Clone)]
struct Token {
    header: HeaderValue,
    renew_at: Duration,
    generation: u64,
    /// How many seconds in the past its `nbf` was set: a 1003 to any token drops a cached
    /// one signed with less than [`MAX_NOT_BEFORE_SKEW`], which the server would refuse too.
    not_before: u64,
}

impl Token {
    /// Whether a 1003 (`early`) to another token says this one is refused as well.
    fn too_recent(&self, early: bool) -> bool {
        early && self.not_before < MAX_NOT_BEFORE_SKEW.as_secs()
    }
}

pub(crate) struct Shared {
    credentials: Credentials,
    account: AccountId,
    clock: Arc<dyn WallClock>,
    /// `clock.passes_with_tokio()`, asked once.
    passes_with_tokio: bool,
    renew_before: Duration,
    /// The fixed header of an API key, one copy per thread lane ([`ApiKeyHeaders`]).
    static_header: Option<ApiKeyHeaders>,
    /// The issuer and key of a JWT.
    signer: Option<(Arc<str>, EncodingKey)>,
    token: Mutex<Option<Token>>,
    /// The generation of the token in `token` (0 for none): threads whose own copy
    /// ([`local`]) is of this generation send it without taking the lock.
    current: AtomicU64,
    signed: AtomicU64,
    /// How many seconds `nbf` is set in the past: [`NOT_BEFORE_SKEW`], and
    /// [`MAX_NOT_BEFORE_SKEW`] after a 1003.
    not_before: AtomicU64,
    /// This cache's key in the threads' copies.
    id: u64,
}

impl Shared {
    /// [`AuthLayer::check_endpoint`]; an API key's requests are not looked at (inlined, so
    /// that costs them one test, not a call).
    #[inline]
    fn check_endpoint<B>(&self, request: &Request<B>) -> Result<(), ApiKeyRequired> {
        if self.static_header.is_none() {
            return jwt_endpoint_check(request);
        }
        Ok(())
    }

    /// The header to send now, its token generation (0 for an API key) and, when `owner` asks
    /// for it, the way back here to drop a refused token: the API key's static value; for a
    /// JWT this thread's own copy while it is current, else the shared one (signing a token if
    /// needed), copied for this thread.
    #[inline]
    fn header(self: &Arc<Self>, owner: bool) -> Result<Found, SigningError> {
        if let Some(headers) = &self.static_header {
            return Ok((headers.get().clone(), 0, None));
        }
        // A clock whose time passes as tokio's: the call's reading of tokio's clock, which
        // the layers above took already, instead of a wall-clock read per request.
        let now = if self.passes_with_tokio {
            local::Now::Tokio(call_clock::now())
        } else {
            local::Now::Unix(self.clock.unix_now())
        };
        let current = self.current.load(Ordering::Acquire);
        if current != 0
            && let Some((own, owner)) = local::get(self.id, current, now, owner)
        {
            return Ok((own, current, owner));
        }
        self.shared_header(self.clock.unix_now(), owner)
    }

    /// [`header`](Shared::header) for a JWT, under the lock.
    #[cold]
    fn shared_header(self: &Arc<Self>, now: Duration, owner: bool) -> Result<Found, SigningError> {
        let mut token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        let current = match token.as_ref() {
            Some(t) if now < t.renew_at => t,
            _ => self.replace(&mut token, self.sign(now)?),
        };
        let back: local::Owner = Arc::new(Arc::downgrade(self));
        let renew_by = call_clock::now() + current.renew_at.saturating_sub(now);
        local::put(
            self.id,
            current.generation,
            current.renew_at,
            renew_by,
            &current.header,
            back.clone(),
        );
        Ok((
            current.header.clone(),
            current.generation,
            owner.then_some(back),
        ))
    }

    /// Makes `fresh` the cached token.
    fn replace<'a>(&self, token: &'a mut Option<Token>, fresh: Token) -> &'a Token {
        self.current.store(fresh.generation, Ordering::Release);
        token.insert(fresh)
    }

    /// Drops the cached token if it is still generation `refused`, so the next request signs
    /// afresh (a token another request signed since is kept); `early` (a 1003) also sets the
    /// next tokens' `nbf` further back ([`Shared::widen_not_before`]), and drops a token
    /// signed since with the narrower margin (the clock that was ahead still is).
    fn invalidate(&self, refused: u64, early: bool) {
        let mut token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if early {
            self.widen_not_before();
        }
        if token
            .as_ref()
            .is_some_and(|t| t.generation == refused || t.too_recent(early))
        {
            *token = None;
            self.current.store(0, Ordering::Release);
        }
    }

    /// A fresh header after the server refused generation `refused` (`early`: with a 1003); a
    /// token another request signed since is reused rather than signing again, unless a 1003
    /// says its margin is too narrow.
    fn resign(&self, refused: u64, early: bool) -> Result<(HeaderValue, u64), SigningError> {
        let mut token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if early {
            self.widen_not_before();
        }
        if let Some(t) = token.as_ref()
            && t.generation != refused
            && !t.too_recent(early)
        {
            return Ok((t.header.clone(), t.generation));
        }
        let fresh = self.sign(self.clock.unix_now())?;
        let fresh = self.replace(&mut token, fresh);
        Ok((fresh.header.clone(), fresh.generation))
    }

    /// Sets `nbf` [`MAX_NOT_BEFORE_SKEW`] in the past for the tokens signed from now on, under
    /// the token's lock. At once rather than doubling from 5 s: a clock a minute ahead took
    /// four refused tokens to catch up with, and every call that carried one of them failed
    /// with its 1003.
    fn widen_not_before(&self) {
        self.not_before
            .store(MAX_NOT_BEFORE_SKEW.as_secs(), Ordering::Relaxed);
    }

    fn sign(&self, now: Duration) -> Result<Token, SigningError> {
        let Some((access, key)) = &self.signer else {
            return Err(SigningError::new(
                jsonwebtoken::errors::ErrorKind::InvalidKeyFormat.into(),
            ));
        };
        let now_secs = now.as_secs();
        let not_before = self.not_before.load(Ordering::Relaxed);
        let claims = Claims {
            iss: access,
            exp: now_secs + TOKEN_LIFETIME.as_secs(),
            nbf: now_secs.saturating_sub(not_before),
        };
        let jwt = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .map_err(SigningError::new)?;
        let mut header = HeaderValue::try_from(format!("Bearer {jwt}"))
            .map_err(|_| SigningError::new(jsonwebtoken::errors::ErrorKind::InvalidToken.into()))?;
        // Like the API key's header: `Debug` of a request (a log line, a trace) shows
        // `Sensitive`, never the token.
        header.set_sensitive(true);
        let generation = self.signed.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Token {
            header,
            renew_at: Duration::from_secs(now_secs) + TOKEN_LIFETIME - self.renew_before,
            generation,
            not_before,
        })
    }
}

impl Drop for Shared {
    /// A JWT's copies in the threads go with it (see [`local`]).
    fn drop(&mut self) {
        if self.signer.is_some() {
            local::dropped(self.id);
        }
    }
}

/// An API key's `Authorization` value, one copy per thread lane ([`kling_core::lanes`]).
///
/// Every request clones its thread's copy: a reference count, no allocation, no lock. Each
/// copy is `Bearer <key>`, marked sensitive, over bytes of its own (their count alone on its
/// cache lines, [`BearerText`]), so the threads of a runtime each write their own count: one
/// copy for all of them had its count's line move between their cores twice a request
/// (`bytes::bytes::owned_clone`). A copy's bytes are freed when the layer and the last request
/// carrying them are gone, never kept for the life of the process: a gateway that builds
/// stacks from many keys, or a process that rotates keys, holds only the keys in use.
struct ApiKeyHeaders([HeaderValue; LANES]);

impl ApiKeyHeaders {
    /// The copies of `Bearer <key>`, or `None` when it is no header value (refused when the
    /// credentials were made).
    fn new(key: &str) -> Option<ApiKeyHeaders> {
        let copies: Vec<HeaderValue> = (0..LANES)
            .map(|_| api_key_header(key))
            .collect::<Option<_>>()?;
        copies.try_into().ok().map(ApiKeyHeaders)
    }

    /// The current thread's copy.
    #[inline]
    fn get(&self) -> &HeaderValue {
        // (`current` is below `LANES` already: the remainder only spares a bounds check.)
        &self.0[lanes::current() % LANES]
    }
}

/// `Bearer <key>`, marked sensitive, over bytes the value and its clones own together.
fn api_key_header(key: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_maybe_shared(Bytes::from_owner(BearerText::new(key))).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// The text of an API key's `Authorization` value, owned by the bytes made from it. Aligned as
/// a lane ([`kling_core::lanes::Lane`]): the bytes' reference count is kept beside it, and so
/// lies on cache lines no other value shares.
#[repr(align(128))]
struct BearerText(String);

impl BearerText {
    fn new(key: &str) -> BearerText {
        #[cfg(test)]
        tests::count_bearer_text(1);
        BearerText(format!("Bearer {key}"))
    }
}

impl AsRef<[u8]> for BearerText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

#[cfg(test)]
impl Drop for BearerText {
    fn drop(&mut self) {
        tests::count_bearer_text(-1);
    }
}

/// Applies [`Auth`] to a service. See the [module docs](self).
///
/// # Clone
///
/// Clones (and every service they build) share the credentials and the token cache: one
/// token is signed for all of them.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
    resend: bool,
}

impl fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer")
            .field("credentials", &self.shared.credentials)
            .field("renew_before", &self.shared.renew_before)
            .field("clock", &self.shared.clock)
            .field("resend_on_refusal", &self.resend)
            .finish()
    }
}

impl AuthLayer {
    /// An auth layer on the system clock, renewing tokens 5 minutes before expiry.
    pub fn new(credentials: Credentials) -> AuthLayer {
        AuthLayer::build(credentials, Arc::new(SystemClock), DEFAULT_RENEW_BEFORE)
    }

    fn build(
        credentials: Credentials,
        clock: Arc<dyn WallClock>,
        renew_before: Duration,
    ) -> AuthLayer {
        let static_header = match &credentials.kind {
            Kind::ApiKey(key) => ApiKeyHeaders::new(key),
            Kind::AccessKey { .. } => None,
        };
        let signer = match &credentials.kind {
            Kind::AccessKey { access, secret } => EncodingKey::from_secret(secret)
                .ok()
                .map(|key| (access.clone(), key)),
            Kind::ApiKey(_) => None,
        };
        AuthLayer {
            shared: Arc::new(Shared {
                account: credentials.account_id(),
                signer,
                credentials,
                passes_with_tokio: clock.passes_with_tokio(),
                clock,
                renew_before,
                static_header,
                token: Mutex::new(None),
                current: AtomicU64::new(0),
                signed: AtomicU64::new(0),
                not_before: AtomicU64::new(NOT_BEFORE_SKEW.as_secs()),
                id: local::next_id(),
            }),
            resend: true,
        }
    }

    /// Reads the wall clock from `clock` (e.g. a
    /// [`TokioWallClock`](crate::clock::TokioWallClock) in paused-time tests).
    pub fn with_clock(self, clock: impl WallClock) -> AuthLayer {
        AuthLayer::build(
            self.shared.credentials.clone(),
            Arc::new(clock),
            self.shared.renew_before,
        )
        .resend_on_refusal(self.resend)
    }

    /// Whether a JWT request the server refused with 1003/1004 is signed afresh and sent once
    /// more by this layer (default `true`). With `false` the layer keeps no copy of the
    /// request: it drops the refused token and marks the response [`TokenDropped`], for a
    /// retry layer above to send again ([`KlingPolicy`](kling_retry::KlingPolicy) does, once
    /// per call). Set `false` only under such a layer. Clones keep sharing the token cache.
    pub fn resend_on_refusal(mut self, on: bool) -> AuthLayer {
        self.resend = on;
        self
    }

    /// Signs a cached token again this long before it expires; must be below the 1800 s
    /// lifetime.
    pub fn renew_before(self, margin: Duration) -> Result<AuthLayer, ConfigError> {
        if margin >= TOKEN_LIFETIME {
            return Err(ConfigError::new(
                "renew_before",
                "must be below the 1800 s token lifetime",
            ));
        }
        Ok(AuthLayer::build(
            self.shared.credentials.clone(),
            self.shared.clock.clone(),
            margin,
        )
        .resend_on_refusal(self.resend))
    }

    /// Refuses `request` when these credentials cannot be sent on its endpoint: an access key
    /// pair's JWT on a new-style one (a create at `/{product}/{model}`, a query or list at
    /// `/tasks`), which Kling takes only with an API key. The layer's own check, before it
    /// signs or sends; a stack can ask it at its entry too, so that such a request waits for
    /// no rate turn or task slot (which the layers above this one give it) only to be refused.
    pub fn check_endpoint<B>(&self, request: &Request<B>) -> Result<(), ApiKeyRequired> {
        self.shared.check_endpoint(request)
    }

    /// The account id the layer sets on requests without one.
    pub fn account_id(&self) -> &AccountId {
        &self.shared.account
    }

    /// Whether the layer signs tokens (an access key pair), and so checks endpoints
    /// ([`check_endpoint`](Self::check_endpoint)); an API key's requests are not looked at.
    pub(crate) fn signs_tokens(&self) -> bool {
        self.shared.static_header.is_none()
    }

    /// How many tokens have been signed (0 for an API key).
    pub fn tokens_signed(&self) -> u64 {
        self.shared.signed.load(Ordering::Relaxed)
    }

    /// The `Authorization` value the next request would carry (signing a token if needed).
    /// Marked sensitive.
    pub fn authorization(&self) -> Result<HeaderValue, SigningError> {
        self.shared.header(false).map(|(mut v, _, _)| {
            v.set_sensitive(true);
            v
        })
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            shared: self.shared.clone(),
            resend: self.resend,
            set_account: true,
        }
    }
}

impl AuthLayer {
    /// [`Layer::layer`] for the stack ([`Kling`](crate::Kling)), whose service sets every
    /// request's [`AccountId`] before it reaches this layer (and whose layers in between keep
    /// it): the auth service skips looking for it again.
    pub(crate) fn layer_below_account<S>(&self, inner: S) -> Auth<S> {
        Auth {
            set_account: false,
            ..self.layer(inner)
        }
    }
}

/// Sets `Authorization` and the [`AccountId`]; on 1003/1004 re-signs and resends once, or
/// leaves the resend to a retry layer above. See the [module docs](self).
///
/// # Clone
///
/// Clones share the token cache with each other and with the [`AuthLayer`] that built them.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    shared: Arc<Shared>,
    resend: bool,
    /// Whether to set the [`AccountId`] (false only under [`Kling`](crate::Kling), which did).
    set_account: bool,
}

impl<S: fmt::Debug> fmt::Debug for Auth<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("inner", &self.inner)
            .field("account", &self.shared.account)
            .finish_non_exhaustive()
    }
}

impl<S> Auth<S> {
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

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>> + Clone,
    S::Error: Into<BoxError>,
    B: Clone,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = future::ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if self.set_account {
            AccountId::set_if_absent(&mut request, &self.shared.account);
        }
        // A JWT where Kling takes only an API key: refused here, before a token is signed or
        // anything sent, rather than sent for a certain 401 (code 1000).
        if let Err(refused) = self.shared.check_endpoint(&request) {
            return future::ResponseFuture::failed(Box::new(refused));
        }
        let drops = self.shared.static_header.is_none() && !self.resend;
        let (header, generation, owner) = match self.shared.header(drops) {
            Ok(found) => found,
            Err(e) => return future::ResponseFuture::failed(Box::new(e)),
        };
        request.headers_mut().insert(AUTHORIZATION, header);
        // Only a JWT can be refreshed: keep what a second attempt needs, or, when a retry layer
        // above resends, what dropping the refused token needs (this thread's way back to the
        // cache: no write to the reference count every thread shares).
        let refusal = match (self.shared.static_header.is_none(), self.resend, owner) {
            (false, _, _) => future::Refusal::Pass,
            (true, true, _) => future::Refusal::Resend(future::Retry::new(
                &request,
                self.inner.clone(),
                self.shared.clone(),
                generation,
            )),
            (true, false, Some(owner)) => future::Refusal::Drop { owner, generation },
            // `header` gives a JWT's owner whenever asked: unreachable, and harmless.
            (true, false, None) => future::Refusal::Pass,
        };
        future::ResponseFuture::new(self.inner.call(request), refusal)
    }
}

/// A JWT's request refused if it goes to a new-style endpoint ([`api_key_only_kind`]).
#[inline(never)]
fn jwt_endpoint_check<B>(request: &Request<B>) -> Result<(), ApiKeyRequired> {
    match api_key_only_kind(request) {
        Some(kind) => Err(ApiKeyRequired::new(
            request.uri().path(),
            kind == RequestKind::Create,
        )),
        None => Ok(()),
    }
}

/// The kind of `request` (a create at `/{product}/{model}`, a query or list at `/tasks`) when
/// it goes to a new-style endpoint, where Kling takes only an API key: read from the
/// recognition the stack cached (one extension lookup), else from the method and path (no
/// allocation for an ordinary path). `/account/costs` is of no generation, and takes a JWT.
/// Another method on a new-style path (`PUT /tasks`) names no endpoint: it is sent, for the
/// server's own 404 (wrong method), which an API key would meet too.
fn api_key_only_kind<B>(request: &Request<B>) -> Option<RequestKind> {
    let (kind, generation) = match Recognized::cached(request) {
        Some(recognized) => (recognized.kind, recognized.generation),
        None => {
            let route = Route::of(request.method(), request.uri().path());
            (route.kind, route.generation)
        }
    };
    let api_key_only = generation == Some(ApiGeneration::New)
        && matches!(
            kind,
            RequestKind::Create | RequestKind::Query | RequestKind::List
        );
    api_key_only.then_some(kind)
}

/// A request to a new-style endpoint (`/{product}/{model}`, `/tasks`) with an access key pair,
/// refused before it was sent: Kling takes only an API key there and answers a JWT with 401
/// code 1000, so sending it would only spend a request on a certain refusal.
///
/// Its [`source`](std::error::Error::source) is a [`NotSent::for_good`] over
/// [`RefusedBeforeSending`]: the request never left, and every attempt of it is refused again
/// ([`will_recur`](kling_core::error::will_recur)), so a retry layer returns it at once and a
/// [`Follower`](crate::follow::Follower) ends the follow rather than asking again until its
/// deadline.
///
/// Its message offers what works for the request: an API key, or for a create a legacy create
/// path (`/v1/...`), which takes the key pair; a new-style task is queried and listed at
/// `/tasks` only (a legacy path knows legacy tasks alone), so there the API key is the fix.
#[derive(Clone, Debug)]
pub struct ApiKeyRequired {
    path: String,
    /// A create, which a legacy create path could make instead; else a query or list.
    create: bool,
    refused: Arc<NotSent>,
}

impl ApiKeyRequired {
    fn new(path: &str, create: bool) -> ApiKeyRequired {
        ApiKeyRequired {
            path: path.to_owned(),
            create,
            refused: Arc::new(NotSent::for_good(RefusedBeforeSending)),
        }
    }

    /// The refused request's path (no query string).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl PartialEq for ApiKeyRequired {
    fn eq(&self, other: &ApiKeyRequired) -> bool {
        self.path == other.path && self.create == other.create
    }
}

impl Eq for ApiKeyRequired {}

impl fmt::Display for ApiKeyRequired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "new-style endpoint `{}` takes an API key; these credentials are an access key pair: \
             use `Credentials::api_key` / `KLING_API_KEY`",
            self.path
        )?;
        if self.create {
            f.write_str(", or a legacy create path (`/v1/...`), which takes the key pair")
        } else {
            f.write_str(" (new-style tasks are queried and listed at `/tasks` only)")
        }
    }
}

impl std::error::Error for ApiKeyRequired {
    /// Never sent, and refused again on every attempt (see the type's docs).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.refused)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    /// A credential variable set to bytes that are not UTF-8 is refused naming it (it read as
    /// unset: "KLING_API_KEY is not set", or the access key pair taken instead).
    #[cfg(unix)]
    #[test]
    fn a_credential_variable_that_is_not_utf8_is_refused_naming_it() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;

        let lookup = |bad: &'static str| {
            move |name: &str| match name {
                _ if name == bad => Some(OsString::from_vec(b"ak-\xe9".to_vec())),
                "KLING_ACCESS_KEY" => Some(OsString::from("ak")),
                "KLING_SECRET_KEY" => Some(OsString::from("sk")),
                _ => None,
            }
        };
        for bad in ["KLING_API_KEY", "KLING_ACCESS_KEY", "KLING_SECRET_KEY"] {
            let err = Credentials::from_os_lookup(lookup(bad)).unwrap_err();
            assert_eq!(err.field(), bad);
            assert!(err.to_string().contains("UTF-8"), "{err}");
        }
        // The control: text is read.
        assert!(Credentials::from_os_lookup(lookup("KLING_OTHER")).is_ok());
    }

    /// A variable the credentials do not use is not read: a non-UTF-8 `KLING_ACCESS_KEY` or
    /// `KLING_SECRET_KEY` beside a `KLING_API_KEY` (which wins) fails nothing; one they do use
    /// is refused naming it, and no error shows any of its bytes.
    #[cfg(unix)]
    #[test]
    fn a_credential_variable_not_used_is_not_read() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;

        const BAD: &[u8] = b"sk-hidden-\xe9";
        let lookup = |vars: &'static [(&'static str, Option<&'static str>)]| {
            move |name: &str| {
                let (_, value) = vars.iter().find(|(var, _)| *var == name)?;
                Some(match value {
                    Some(text) => OsString::from(text),
                    None => OsString::from_vec(BAD.to_vec()),
                })
            }
        };
        let api_key = Credentials::api_key("k").unwrap().account_id();
        for vars in [
            &[("KLING_API_KEY", Some("k")), ("KLING_ACCESS_KEY", None)][..],
            &[("KLING_API_KEY", Some("k")), ("KLING_SECRET_KEY", None)],
            &[
                ("KLING_API_KEY", Some("k")),
                ("KLING_ACCESS_KEY", None),
                ("KLING_SECRET_KEY", None),
            ],
            // Both sets: the API key wins, as with text.
            &[
                ("KLING_API_KEY", Some("k")),
                ("KLING_ACCESS_KEY", Some("a")),
                ("KLING_SECRET_KEY", None),
            ],
        ] {
            let credentials = Credentials::from_os_lookup(lookup(vars))
                .unwrap_or_else(|e| panic!("{vars:?}: {e}"));
            assert!(!credentials.is_jwt());
            assert_eq!(credentials.account_id(), api_key);
        }
        let both = Credentials::from_os_lookup(lookup(&[
            ("KLING_API_KEY", Some("k")),
            ("KLING_ACCESS_KEY", Some("a")),
            ("KLING_SECRET_KEY", Some("s")),
        ]))
        .unwrap();
        assert_eq!(both.account_id(), api_key, "the API key wins");

        // Used: refused naming it (a blank API key counts as unset, so the pair is read).
        for (vars, named) in [
            (
                &[("KLING_ACCESS_KEY", None), ("KLING_SECRET_KEY", Some("s"))][..],
                "KLING_ACCESS_KEY",
            ),
            (
                &[
                    ("KLING_API_KEY", Some(" ")),
                    ("KLING_ACCESS_KEY", Some("a")),
                    ("KLING_SECRET_KEY", None),
                ],
                "KLING_SECRET_KEY",
            ),
            (&[("KLING_ACCESS_KEY", None)], "KLING_ACCESS_KEY"),
            (&[("KLING_SECRET_KEY", None)], "KLING_SECRET_KEY"),
            (
                &[
                    ("KLING_API_KEY", None),
                    ("KLING_ACCESS_KEY", Some("a")),
                    ("KLING_SECRET_KEY", Some("s")),
                ],
                "KLING_API_KEY",
            ),
        ] {
            let err = Credentials::from_os_lookup(lookup(vars)).unwrap_err();
            assert_eq!(err.field(), named, "{vars:?}: {err}");
            assert!(err.reason().contains("UTF-8"), "{err}");
            for shown in [err.to_string(), format!("{err:?}")] {
                for part in ["hidden", "\u{fffd}", "xe9", "xE9"] {
                    assert!(!shown.contains(part), "{shown}");
                }
            }
        }
        // Nor a text value refused.
        let text = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                let (_, value) = vars.iter().find(|(var, _)| *var == name)?;
                Some(value.to_string())
            }
        };
        for vars in [
            &[("KLING_API_KEY", "sk-hidden\n1")][..],
            &[("KLING_ACCESS_KEY", "sk-hidden")],
            &[("KLING_SECRET_KEY", "sk-hidden")],
        ] {
            let err = Credentials::from_lookup(text(vars)).unwrap_err();
            for shown in [err.to_string(), format!("{err:?}")] {
                assert!(!shown.contains("hidden"), "{shown}");
            }
        }
    }

    /// A wall clock tests move by hand.
    #[derive(Debug, Clone, Default)]
    struct ManualClock(Arc<AtomicU64>);

    impl ManualClock {
        fn set(&self, secs: u64) {
            self.0.store(secs, Ordering::SeqCst);
        }
    }

    impl WallClock for ManualClock {
        fn unix_now(&self) -> Duration {
            Duration::from_secs(self.0.load(Ordering::SeqCst))
        }
    }

    /// The header and generation [`Shared::header`] finds.
    fn pair(shared: &Arc<Shared>) -> (HeaderValue, u64) {
        let (value, generation, _) = shared.header(false).unwrap();
        (value, generation)
    }

    fn jwt(clock: &ManualClock) -> AuthLayer {
        AuthLayer::new(Credentials::access_key("ak", "sk").unwrap()).with_clock(clock.clone())
    }

    /// A thread's own copy is sent only while it is the current token: a token dropped on
    /// another thread, or one due for renewal, is signed afresh.
    #[test]
    fn a_threads_copy_follows_the_shared_token() {
        let clock = ManualClock::default();
        clock.set(1_000_000);
        let layer = jwt(&clock);
        let (first, generation) = pair(&layer.shared);
        assert_eq!(pair(&layer.shared), (first.clone(), generation));
        assert_eq!(layer.tokens_signed(), 1);

        let shared = layer.shared.clone();
        std::thread::spawn(move || {
            assert_eq!(pair(&shared).1, generation);
            shared.invalidate(generation, false);
        })
        .join()
        .unwrap();
        let (second, next) = pair(&layer.shared);
        assert_ne!(next, generation);
        // Signed at the same second with the same claims: the same text, a new generation.
        assert_eq!(second, first);
        assert_eq!(layer.tokens_signed(), 2);

        // Due for renewal (the copy's time, not only the shared token's, is checked).
        clock.set(1_000_000 + (TOKEN_LIFETIME - DEFAULT_RENEW_BEFORE).as_secs());
        let (_, renewed) = pair(&layer.shared);
        assert_ne!(renewed, next);
        assert_eq!(layer.tokens_signed(), 3);

        // A token re-signed after a refusal on another thread replaces this thread's copy.
        let shared = layer.shared.clone();
        let resigned = std::thread::spawn(move || shared.resign(renewed, false).unwrap().1)
            .join()
            .unwrap();
        assert_eq!(pair(&layer.shared).1, resigned);
        assert_eq!(layer.tokens_signed(), 4);
    }

    /// A 1003 to the current token sets `nbf`'s margin to the cap at once; a 1004 leaves it.
    #[test]
    fn a_1003_widens_nbf_to_the_cap_at_once() {
        let clock = ManualClock::default();
        clock.set(1_000_000);
        let layer = jwt(&clock);
        let margin = |shared: &Shared| shared.not_before.load(Ordering::Relaxed);
        let (_, first) = pair(&layer.shared);
        layer.shared.invalidate(first, false);
        assert_eq!(margin(&layer.shared), NOT_BEFORE_SKEW.as_secs());
        let (_, second) = pair(&layer.shared);
        layer.shared.invalidate(second, true);
        assert_eq!(margin(&layer.shared), MAX_NOT_BEFORE_SKEW.as_secs());
        let (header, third) = pair(&layer.shared);
        assert_eq!(
            claims_nbf(&header),
            1_000_000 - MAX_NOT_BEFORE_SKEW.as_secs()
        );
        layer.shared.resign(third, true).unwrap();
        assert_eq!(margin(&layer.shared), MAX_NOT_BEFORE_SKEW.as_secs());
    }

    /// A 1003 to a token no longer cached (another request re-signed meanwhile, with the
    /// narrow margin) still widens `nbf`, and drops the narrow token it would otherwise keep:
    /// the clock that was ahead still is, so that token would be refused as well.
    #[test]
    fn a_1003_to_an_older_token_widens_and_drops_a_narrow_one() {
        let clock = ManualClock::default();
        clock.set(1_000_000);
        let layer = jwt(&clock);
        let margin = |shared: &Shared| shared.not_before.load(Ordering::Relaxed);
        let (_, first) = pair(&layer.shared);
        // A 1004 to it on one request: re-signed with the narrow margin.
        let (_, second) = layer.shared.resign(first, false).unwrap();
        assert_ne!(second, first);
        // A 1003 to `first`, answered late, on another request.
        let (header, third) = layer.shared.resign(first, true).unwrap();
        assert_eq!(margin(&layer.shared), MAX_NOT_BEFORE_SKEW.as_secs());
        assert_ne!(third, second, "the narrow token would be refused 1003 too");
        assert_eq!(
            claims_nbf(&header),
            1_000_000 - MAX_NOT_BEFORE_SKEW.as_secs()
        );
        // A wide token is kept: another late 1003 to `first` reuses it.
        assert_eq!(layer.shared.resign(first, true).unwrap().1, third);

        // The same through `invalidate` (the stack's way: the retry layer resends).
        let layer = jwt(&clock);
        let (_, first) = pair(&layer.shared);
        let (_, second) = layer.shared.resign(first, false).unwrap();
        layer.shared.invalidate(first, true);
        assert_eq!(margin(&layer.shared), MAX_NOT_BEFORE_SKEW.as_secs());
        let (header, next) = pair(&layer.shared);
        assert_ne!(next, second);
        assert_eq!(
            claims_nbf(&header),
            1_000_000 - MAX_NOT_BEFORE_SKEW.as_secs()
        );
        // A 1004 to an older token leaves the current one alone.
        layer.shared.invalidate(first, false);
        assert_eq!(pair(&layer.shared).1, next);
        layer.shared.invalidate(first, true);
        assert_eq!(pair(&layer.shared).1, next, "already wide: kept");
    }

    fn claims_nbf(header: &HeaderValue) -> u64 {
        use base64::Engine as _;
        let token = header.to_str().unwrap().strip_prefix("Bearer ").unwrap();
        let claims = token.split('.').nth(1).unwrap();
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap();
        let claims: serde_json::Value = serde_json::from_slice(&claims).unwrap();
        claims["nbf"].as_u64().unwrap()
    }

    /// A secret key read with its line end signs as the key itself does, as an access key or
    /// API key read that way is already taken without it.
    #[test]
    fn whitespace_around_the_secret_key_is_not_part_of_it() {
        let clock = ManualClock::default();
        clock.set(1_000_000);
        let signed = |secret: &str| {
            let layer = AuthLayer::new(Credentials::access_key("ak", secret).unwrap())
                .with_clock(clock.clone());
            pair(&layer.shared).0
        };
        assert_eq!(signed("sk\r\n"), signed("sk"));
        assert_eq!(signed(" sk "), signed("sk"));
        assert_ne!(signed("sk2"), signed("sk"));
        assert!(Credentials::access_key("ak", " \n").is_err());
    }

    /// The way back to the cache leads to it while the layer lives, and keeps neither it nor
    /// its credentials alive after.
    #[test]
    fn the_way_back_does_not_keep_the_layer_alive() {
        let clock = ManualClock::default();
        let layer = jwt(&clock);
        let (_, generation, owner) = layer.shared.header(true).unwrap();
        let owner = owner.expect("asked for");
        assert!(Arc::ptr_eq(&owner.upgrade().unwrap(), &layer.shared));
        // From the thread's copy too.
        let (_, again, from_copy) = layer.shared.header(true).unwrap();
        assert_eq!(again, generation);
        assert!(Arc::ptr_eq(&from_copy.unwrap(), &owner));
        owner.upgrade().unwrap().invalidate(generation, false);
        assert_eq!(layer.shared.current.load(Ordering::SeqCst), 0);
        let weak = Arc::downgrade(&layer.shared);
        drop(layer);
        assert!(weak.upgrade().is_none());
        assert!(owner.upgrade().is_none());
    }

    /// A thread's copy of a JWT goes with its layer: at once on the thread that drops the
    /// layer, and on any other thread at its next JWT request (through any layer), so a signed
    /// token does not stay in a thread's memory for as long as the thread lives. A later layer
    /// on that thread, in the same slot, never reads it.
    #[test]
    fn a_threads_copy_of_a_token_goes_with_its_layer() {
        let clock = ManualClock::default();
        clock.set(1_000_000);

        // On the thread that drops it.
        let layer = jwt(&clock);
        let id = layer.shared.id;
        let (token, _) = pair(&layer.shared);
        assert!(local::holds(id));
        drop(layer);
        assert!(
            !local::holds(id),
            "dropped on the thread that dropped its layer"
        );
        // A layer of another account in the same slot signs its own token.
        let other = loop {
            let other = AuthLayer::new(Credentials::access_key("ak-other", "sk").unwrap())
                .with_clock(clock.clone());
            if other.shared.id % local::SLOTS as u64 == id % local::SLOTS as u64 {
                break other;
            }
        };
        assert_ne!(pair(&other.shared).0, token);
        assert_eq!(other.tokens_signed(), 1);

        // On another thread, which copied the token and then sends through another layer.
        let layer = jwt(&clock);
        let id = layer.shared.id;
        let (to_main, from_worker) = std::sync::mpsc::channel();
        let (to_worker, from_main) = std::sync::mpsc::channel::<()>();
        let worker = {
            let layer = layer.clone();
            let clock = clock.clone();
            std::thread::spawn(move || {
                pair(&layer.shared);
                drop(layer);
                to_main.send(local::holds(id)).unwrap();
                from_main.recv().unwrap();
                // Another JWT layer, in another slot than the dropped one's.
                let next = loop {
                    let next = jwt(&clock);
                    if next.shared.id % local::SLOTS as u64 != id % local::SLOTS as u64 {
                        break next;
                    }
                };
                pair(&next.shared);
                local::holds(id)
            })
        };
        assert!(from_worker.recv().unwrap(), "the worker copied the token");
        drop(layer);
        to_worker.send(()).unwrap();
        assert!(
            !worker.join().unwrap(),
            "dropped at the worker's next JWT request"
        );
    }

    /// What a thread that sends no JWT request again keeps once the layer is gone: the signed
    /// token (its own bytes), and nothing of the credentials: the secret key's one reference
    /// left is the test's own, and the weak way back to the cache upgrades to nothing.
    #[test]
    fn a_copy_left_on_an_idle_thread_holds_the_token_and_no_key() {
        let clock = ManualClock::default();
        clock.set(1_000_000);
        let credentials = Credentials::access_key("ak-idle", "sk-idle-secret").unwrap();
        let Kind::AccessKey { secret, .. } = &credentials.kind else {
            unreachable!("an access key")
        };
        let secret = secret.clone();
        let layer = AuthLayer::new(credentials).with_clock(clock.clone());
        let id = layer.shared.id;
        let (to_main, from_worker) = std::sync::mpsc::channel();
        let (to_worker, from_main) = std::sync::mpsc::channel::<()>();
        let worker = {
            let layer = layer.clone();
            std::thread::spawn(move || {
                let (token, _) = pair(&layer.shared);
                drop(layer);
                to_main.send(token).unwrap();
                from_main.recv().unwrap();
                // No JWT request since: the copy is still here, and it is the token alone.
                let kept = local::kept(id);
                kept.map(|(header, owner)| (header, owner.upgrade().is_none()))
            })
        };
        let token = from_worker.recv().unwrap();
        assert!(Arc::strong_count(&secret) > 1, "the layer holds the secret");
        drop(layer);
        assert_eq!(
            Arc::strong_count(&secret),
            1,
            "only the test's copy is left"
        );
        to_worker.send(()).unwrap();
        let (header, gone) = worker
            .join()
            .unwrap()
            .expect("the idle thread's copy is kept");
        assert_eq!(header, token);
        assert!(gone, "the way back reaches no cache");
        let text = header.to_str().unwrap();
        assert!(!text.contains("sk-idle-secret"));
    }

    /// JWT layers that share a thread slot keep their own tokens.
    #[test]
    fn layers_sharing_a_slot_keep_their_own_values() {
        let clock = ManualClock::default();
        let layers: Vec<AuthLayer> = (0..9)
            .map(|i| {
                AuthLayer::new(Credentials::access_key(format!("ak-{i}"), "sk").unwrap())
                    .with_clock(clock.clone())
            })
            .collect();
        let first: Vec<HeaderValue> = layers.iter().map(|l| pair(&l.shared).0).collect();
        for _ in 0..2 {
            for (layer, first) in layers.iter().zip(&first) {
                let (value, generation) = pair(&layer.shared);
                assert_eq!(&value, first);
                assert!(value.is_sensitive());
                assert_eq!(generation, 1);
                assert_eq!(layer.tokens_signed(), 1);
            }
        }
        for (i, a) in first.iter().enumerate() {
            assert!(first[i + 1..].iter().all(|b| b != a), "distinct issuers");
        }
    }

    thread_local! {
        /// [`BearerText`]s made on this thread less those dropped on it: a test that makes and
        /// drops its values on its own thread reads how many of them are alive.
        static BEARER_TEXTS: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    }

    /// Counts a [`BearerText`] made (`1`) or dropped (`-1`) on this thread (none once the
    /// thread is ending).
    pub(super) fn count_bearer_text(change: isize) {
        let _ = BEARER_TEXTS.try_with(|live| live.set(live.get() + change));
    }

    /// An API key's value is the layer's own, sent as is: every request's value shares the
    /// layer's bytes, and another layer on the same key has bytes of its own.
    #[test]
    fn an_api_keys_value_is_the_layers_own() {
        let layer = AuthLayer::new(Credentials::api_key("key-a").unwrap());
        let (value, generation) = pair(&layer.shared);
        let (again, _) = pair(&layer.shared);
        assert_eq!(
            (value.clone(), generation),
            ("Bearer key-a".parse().unwrap(), 0)
        );
        assert_eq!(
            value.as_bytes().as_ptr(),
            again.as_bytes().as_ptr(),
            "shared"
        );
        assert!(value.is_sensitive());
        assert!(format!("{value:?}").contains("Sensitive"));
        let other = AuthLayer::new(Credentials::api_key("key-a").unwrap());
        let (theirs, _) = pair(&other.shared);
        assert_eq!(theirs, value);
        assert_ne!(
            theirs.as_bytes().as_ptr(),
            value.as_bytes().as_ptr(),
            "not kept"
        );
    }

    /// Each thread lane sends a copy of the API key's value in bytes of its own, so the
    /// threads of a runtime write their own reference counts: every copy is the same sensitive
    /// `Bearer <key>`, a thread keeps sending its lane's, and no two lanes share bytes (nor,
    /// with the text aligned as a lane, the cache lines of their counts).
    #[test]
    fn each_lane_sends_an_api_key_value_of_its_own() {
        let layer = AuthLayer::new(Credentials::api_key("key-lanes").unwrap());
        let headers = layer.shared.static_header.as_ref().expect("an API key");
        for (i, header) in headers.0.iter().enumerate() {
            assert_eq!(header, "Bearer key-lanes");
            assert!(header.is_sensitive());
            let others = &headers.0[i + 1..];
            assert!(
                others
                    .iter()
                    .all(|other| other.as_bytes().as_ptr() != header.as_bytes().as_ptr()),
                "lane {i} shares its bytes"
            );
        }
        assert!(std::mem::align_of::<BearerText>() >= 128);
        let here = lanes::current();
        let sent = pair(&layer.shared).0;
        assert_eq!(
            sent.as_bytes().as_ptr(),
            headers.0[here].as_bytes().as_ptr()
        );
        // Another thread sends its own lane's copy.
        let shared = layer.shared.clone();
        let (lane, theirs) = std::thread::spawn(move || {
            let sent = pair(&shared).0;
            (lanes::current(), sent.as_bytes().as_ptr() as usize)
        })
        .join()
        .unwrap();
        assert_eq!(theirs, headers.0[lane].as_bytes().as_ptr() as usize);
        for shown in [format!("{layer:?}"), format!("{sent:?}")] {
            assert!(!shown.contains("key-lanes"), "{shown}");
        }
    }

    /// A thousand layers, each with a key of its own: the value of each is freed with the layer
    /// and the requests that carried it, none is kept for the life of the process.
    #[test]
    fn api_key_values_are_freed_with_their_layer() {
        let live = || BEARER_TEXTS.with(|live| live.get());
        let before = live();
        for i in 0..1000 {
            let layer = AuthLayer::new(Credentials::api_key(format!("rotated-{i}")).unwrap());
            assert_eq!(live(), before + LANES as isize, "one value per lane");
            let sent = layer.authorization().unwrap();
            assert_eq!(sent, format!("Bearer rotated-{i}").as_str());
            drop(layer);
            assert_eq!(live(), before + 1, "kept by the request that carries it");
            drop(sent);
            assert_eq!(live(), before, "freed after {i} keys");
        }
    }
}
