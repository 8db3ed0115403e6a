//! Texts a process is configured with, kept once so that copies of them are plain copies.
//!
//! An `Arc<str>` or a shared `Bytes` costs a write to its reference count on every clone and
//! every drop. The stack copies a few configured texts into every request (its account id, its
//! base URL's host), and when the threads of a runtime do that at once, the count's cache line
//! moves between their cores on every request. A `&'static str` is copied for free.
//!
//! [`BoundedLabels`] keeps texts that input chooses (metric label values) the same way, up to
//! a bound.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError, RwLock};

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

/// Label texts chosen by input (a model named in a path, a code in an answer), kept for the
/// rest of the process up to a bound: a metrics recorder keeps every series it was given, so
/// past the bound the caller falls back to a shared label (`other`) instead of a new one.
///
/// ```
/// use kling_core::intern::BoundedLabels;
///
/// static LABELS: BoundedLabels = BoundedLabels::new(1);
/// let kept = LABELS.find_or_keep(|l| l == "a", || "a".to_owned());
/// assert_eq!(kept, Some(("a", 0)));
/// assert_eq!(LABELS.find_or_keep(|l| l == "a", || unreachable!()), kept);
/// assert_eq!(LABELS.find_or_keep(|l| l == "b", || "b".to_owned()), None);
/// ```
#[derive(Debug)]
pub struct BoundedLabels {
    labels: RwLock<Vec<&'static str>>,
    max: usize,
}

impl BoundedLabels {
    /// Keeps at most `max` labels.
    pub const fn new(max: usize) -> BoundedLabels {
        BoundedLabels {
            labels: RwLock::new(Vec::new()),
            max,
        }
    }

    /// The kept label `is` picks, with its place in the order kept; `None` when none is. Never
    /// keeps one: a read lock and a scan.
    ///
    /// ```
    /// use kling_core::intern::BoundedLabels;
    ///
    /// static LABELS: BoundedLabels = BoundedLabels::new(2);
    /// assert_eq!(LABELS.find(|l| l == "a"), None);
    /// LABELS.find_or_keep(|l| l == "a", || "a".to_owned());
    /// assert_eq!(LABELS.find(|l| l == "a"), Some(("a", 0)));
    /// assert_eq!(LABELS.find(|l| l == "b"), None);
    /// ```
    pub fn find(&self, is: impl Fn(&str) -> bool) -> Option<(&'static str, usize)> {
        let labels = self.labels.read().unwrap_or_else(PoisonError::into_inner);
        let at = labels.iter().position(|label| is(label))?;
        Some((labels[at], at))
    }

    /// The kept label `is` picks, else `make`'s, kept now if fewer than the bound are; with its
    /// place in the order kept. `None` once the bound is reached. A label, once kept, is the
    /// same for the process's life. A read lock and a scan when found; a write lock when not.
    pub fn find_or_keep(
        &self,
        is: impl Fn(&str) -> bool,
        make: impl FnOnce() -> String,
    ) -> Option<(&'static str, usize)> {
        if let Some(found) = self.find(&is) {
            return Some(found);
        }
        let mut labels = self.labels.write().unwrap_or_else(PoisonError::into_inner);
        // Kept by another thread between the two locks.
        if let Some(at) = labels.iter().position(|label| is(label)) {
            return Some((labels[at], at));
        }
        if labels.len() >= self.max {
            return None;
        }
        let label: &'static str = Box::leak(make().into_boxed_str());
        labels.push(label);
        Some((label, labels.len() - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_reads_what_find_or_keep_kept_and_keeps_nothing() {
        let labels = BoundedLabels::new(2);
        assert_eq!(labels.find(|l| l == "a"), None);
        assert_eq!(labels.find(|l| l == "a"), None, "finding kept nothing");
        let kept = labels.find_or_keep(|l| l == "a", || "a".to_owned());
        assert_eq!(kept, Some(("a", 0)));
        assert_eq!(labels.find(|l| l == "a"), kept);
        assert_eq!(labels.find(|l| l == "b"), None);
        assert_eq!(
            labels.find_or_keep(|l| l == "b", || "b".to_owned()),
            Some(("b", 1)),
            "the lookups took no place"
        );
        assert_eq!(
            labels.find(|l| l.len() == 1),
            Some(("a", 0)),
            "the first in order"
        );
        // Full: still found, and a new one is still none.
        assert_eq!(labels.find(|l| l == "b"), Some(("b", 1)));
        assert_eq!(labels.find(|l| l == "c"), None);
    }

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
