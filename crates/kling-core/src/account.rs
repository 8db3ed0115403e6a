//! The account a request is counted against.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use http::Request;

use crate::signals::CallContext;

/// The Kling account whose limits a request counts against, carried as a request extension.
///
/// Kling's limits are account-wide: every API key of an account shares them. The stack sets this
/// from its configured credentials (an id derived from the key, never the secret itself), or a
/// gateway sets it per request. Never key limits by the bearer token: a JWT changes every 30
/// minutes.
///
/// # Clone
///
/// An id made by [`AccountId::new`] is shared: a clone bumps a reference count. Every request
/// of a stack carries its account, and the layers clone it several times per request; when
/// several threads do that, the shared count is a cache line they fight over. An id made by
/// [`AccountId::interned`] (as a stack's own credentials are) clones as a plain copy.
///
/// Two words, either way (thin pointers): limiters keep one in every queued request.
#[derive(Clone)]
pub struct AccountId(Repr);

#[derive(Clone)]
enum Repr {
    /// Interned: copied, never counted.
    Kept(&'static String),
    Shared(Arc<String>),
}

impl AccountId {
    /// An account id from any stable, non-secret name.
    pub fn new(id: impl Into<String>) -> Self {
        AccountId(Repr::Shared(Arc::new(id.into())))
    }

    /// An account id whose text is kept once per distinct name for the rest of the process,
    /// so that clones are plain copies.
    ///
    /// For the few ids a process is configured with (a stack's credentials), not for ids
    /// taken from each request: see [`intern`](crate::intern::intern).
    pub fn interned(id: &str) -> Self {
        AccountId(Repr::Kept(crate::intern::kept(id)))
    }

    /// The id as text, e.g. for metric labels and Redis keys.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Kept(id) => id,
            Repr::Shared(id) => id,
        }
    }

    /// The account id a request carries, if any: the first one set. A layer sets one with
    /// [`AccountId::set_if_absent`] only where the request names none (an `AccountId`
    /// extension the caller inserted, a gateway routing per request, is kept); an extension
    /// inserted after that, below the layer that set it, is not read.
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

// Compared, hashed and ordered by text, however the id is kept.
impl PartialEq for AccountId {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for AccountId {}

impl Hash for AccountId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for AccountId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for AccountId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AccountId").field(&self.as_str()).finish()
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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

#[cfg(test)]
mod tests {
    use std::collections::hash_map::DefaultHasher;

    use super::*;

    fn hash_of(id: &AccountId) -> u64 {
        let mut hasher = DefaultHasher::new();
        id.hash(&mut hasher);
        hasher.finish()
    }

    #[test]
    fn every_form_of_an_id_is_the_same_id() {
        let shared = AccountId::new("acct-1");
        let interned = AccountId::interned("acct-1");
        assert_eq!(std::mem::size_of::<AccountId>(), 16);
        assert_eq!(interned, shared);
        assert_eq!(hash_of(&interned), hash_of(&shared));
        assert_eq!(interned.cmp(&shared), Ordering::Equal);
        assert_eq!(interned.to_string(), "acct-1");
        assert_eq!(format!("{interned:?}"), format!("{shared:?}"));
        assert!(AccountId::interned("acct-0") < shared);
        assert_ne!(AccountId::interned("acct-2"), shared);
    }

    #[test]
    fn a_name_is_interned_once() {
        let name = String::from("acct-interned-once");
        let a = AccountId::interned(&name);
        let b = AccountId::interned(&name);
        assert_eq!(a.as_str().as_ptr(), b.as_str().as_ptr());
        let other = AccountId::interned("acct-interned-other");
        assert_ne!(a.as_str().as_ptr(), other.as_str().as_ptr());
    }
}
