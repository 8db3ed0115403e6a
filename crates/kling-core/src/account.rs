//! The account a request is counted against.

use std::fmt;
use std::sync::Arc;

use http::Request;

use crate::signals::CallContext;

/// The Kling account whose limits a request counts against, carried as a request extension.
///
/// Kling's limits are account-wide: every API key of an account shares them. The stack sets this
/// from its configured credentials (an id derived from the key, never the secret itself), or a
/// gateway sets it per request. Never key limits by the bearer token: a JWT changes every 30
/// minutes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(Arc<str>);

impl AccountId {
    /// An account id from any stable, non-secret name.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        AccountId(id.into())
    }

    /// The id as text, e.g. for metric labels and Redis keys.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The account id a request carries, if any: an `AccountId` extension the caller inserted
    /// (a gateway routing per request), else the one a stack set with
    /// [`AccountId::set_if_absent`].
    pub fn of<B>(request: &Request<B>) -> Option<&AccountId> {
        // The stack only sets its account where the caller named none, so the combined
        // extension is read first (one lookup in the usual case).
        let (call, others) = CallContext::with_others(request);
        call.and_then(|call| call.account.as_ref())
            .or_else(|| CallContext::standalone(request, others))
    }

    /// Counts the request under `account` unless it already names one (kept in the request's
    /// one combined signal extension, see [`signals`](crate::signals)).
    pub fn set_if_absent<B>(request: &mut Request<B>, account: &AccountId) {
        if AccountId::of(request).is_some() {
            return;
        }
        CallContext::of_mut(request).account = Some(account.clone());
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AccountId").field(&&*self.0).finish()
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for AccountId {
    fn from(id: &str) -> Self {
        AccountId::new(id)
    }
}

impl From<String> for AccountId {
    fn from(id: String) -> Self {
        AccountId::new(id)
    }
}
