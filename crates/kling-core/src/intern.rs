//! Texts a process is configured with, kept once so that copies of them are plain copies.
//!
//! An `Arc<str>` or a shared `Bytes` costs a write to its reference count on every clone and
//! every drop. The stack copies a few configured texts into every request (its account id, its
//! base URL's host), and when the threads of a runtime do that at once, the count's cache line
//! moves between their cores on every request. A `&'static str` is copied for free.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// `text`, kept for the rest of the process: one copy per distinct text, however often it is
/// asked for.
///
/// For the few texts a process is configured with, not for values taken from each request:
/// each distinct text stays in memory until the process ends. Takes a process-wide lock; call
/// it when building a stack, not per request.
pub fn intern(text: &str) -> &'static str {
    kept(text).as_str()
}

/// [`intern`], as a thin reference (one word: an [`AccountId`](crate::AccountId) stays two).
pub(crate) fn kept(text: &str) -> &'static String {
    static TEXTS: Mutex<Option<HashMap<&'static str, &'static String>>> = Mutex::new(None);
    let mut texts = TEXTS.lock().unwrap_or_else(PoisonError::into_inner);
    let texts = texts.get_or_insert_with(HashMap::new);
    if let Some(kept) = texts.get(text) {
        return kept;
    }
    let kept: &'static String = Box::leak(Box::new(text.to_owned()));
    texts.insert(kept.as_str(), kept);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_is_kept_once() {
        let text = String::from("intern-test-once");
        let a = intern(&text);
        let b = intern(&text);
        assert_eq!(a, "intern-test-once");
        assert_eq!(a.as_ptr(), b.as_ptr());
        let other = intern("intern-test-other");
        assert_eq!(other, "intern-test-other");
        assert_ne!(a.as_ptr(), other.as_ptr());
    }
}
