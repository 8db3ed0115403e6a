//! [`LocalPauses`]: the pauses this process holds its keys to while a backend's report of them
//! is still on its way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{BucketKey, Feedback};
use crate::policy::{Cooldown, later};

/// The account keys this process holds paused itself, each until the shortest pause its
/// backend may set for the response that asked for it ([`least_pause_until`]).
///
/// A remote store's report (a round trip) is awaited before the response goes back, but a
/// caller may give up on the response meanwhile (a timeout, a `select!`), and the report then
/// runs on its own on the runtime (see [`ResponseFuture`](crate::future)). The key's next
/// decision in this process must see the pause either way, though the store may not have it
/// yet: the layer asks this first. Noted only for a report still to come (the
/// in-process backend's state has the pause already), and an entry ends with its pause, so
/// the table holds at most the keys paused in the last pause's length.
#[derive(Debug, Default)]
pub(crate) struct LocalPauses {
    /// Whether `table` may hold an entry: while none does, a decision takes no lock.
    any: AtomicBool,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    until: HashMap<BucketKey, Instant>,
    /// The latest end held: once it is past, every pause is, and the table is emptied (and
    /// decisions take no lock again) whichever key asks.
    latest: Option<Instant>,
}

impl Table {
    fn forget_past(&mut self, now: Instant) {
        if self.latest.is_none_or(|latest| latest <= now) {
            self.until.clear();
            self.latest = None;
        }
    }
}

impl LocalPauses {
    /// Holds `key` until `until` (or later, if it is held longer already); entries past
    /// `now` are dropped.
    pub(crate) fn hold(&self, key: &BucketKey, until: Instant, now: Instant) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.until.retain(|_, at| *at > now);
        if until > now {
            let at = table.until.entry(key.clone()).or_insert(until);
            *at = (*at).max(until);
            table.latest = table.latest.max(Some(until));
        }
        table.forget_past(now);
        self.any.store(!table.until.is_empty(), Ordering::Release);
    }

    /// The end of `key`'s pause held here, if it is still to come at `now()` (read only
    /// when some key is held).
    #[inline]
    pub(crate) fn held_until(
        &self,
        key: &BucketKey,
        now: impl FnOnce() -> Instant,
    ) -> Option<(Instant, Instant)> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.held_until_slow(key, now())
    }

    #[cold]
    fn held_until_slow(&self, key: &BucketKey, now: Instant) -> Option<(Instant, Instant)> {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        match table.until.get(key) {
            Some(at) if *at > now => Some((*at, now)),
            Some(_) => {
                table.until.remove(key);
                table.forget_past(now);
                self.any.store(!table.until.is_empty(), Ordering::Release);
                None
            }
            None => {
                table.forget_past(now);
                self.any.store(!table.until.is_empty(), Ordering::Release);
                None
            }
        }
    }
}

/// The end of the shortest pause a backend may set for `feedback`, if it asks for one: its
/// `Retry-After`, and for a 1302 the shortest pause of any streak
/// ([`Cooldown::pause`] at its first step and at the burst backoff's, with no emission
/// interval), from when it arrived. The backend's own pause, which its report sets, is never
/// shorter ([`pause_until`](crate::backend::pause_until)); the rest of it holds once the
/// report lands.
pub(crate) fn least_pause_until(cooldown: &Cooldown, feedback: &Feedback) -> Option<Instant> {
    let Feedback::Pause {
        received_at,
        resume_at,
        throttled,
        ..
    } = *feedback
    else {
        return None;
    };
    let escalated = throttled.then(|| {
        let least = cooldown
            .pause(1, Duration::ZERO)
            .min(cooldown.pause(cooldown.escalate_after, Duration::ZERO));
        later(received_at, least)
    });
    match (resume_at, escalated) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use kling_core::AccountId;

    use super::*;

    fn throttled(received_at: Instant, resume_at: Option<Instant>) -> Feedback {
        Feedback::Pause {
            sent_at: received_at,
            received_at,
            resume_at,
            throttled: true,
        }
    }

    /// Never past the pause a backend sets, whatever the streak, the interval and the rule
    /// (a burst backoff shorter than the first pause included).
    #[test]
    fn the_least_pause_is_never_longer_than_the_backends() {
        let now = Instant::now();
        let secs = Duration::from_secs;
        let rules = [
            Cooldown::default(),
            Cooldown::default().first(secs(20)).backoff(secs(5)),
            Cooldown::default().escalate_after(1).backoff(secs(7)),
            Cooldown::default().first(Duration::ZERO),
        ];
        for rule in rules {
            let least = least_pause_until(&rule, &throttled(now, None)).unwrap();
            for streak in 1..30 {
                for interval in [Duration::ZERO, secs(2), secs(90)] {
                    let pause = rule.pause(streak, interval);
                    assert!(least <= now + pause, "{rule:?} {streak} {interval:?}");
                }
            }
        }
        let retry = now + secs(40);
        let rule = Cooldown::default();
        assert_eq!(
            least_pause_until(&rule, &throttled(now, Some(retry))),
            Some(retry)
        );
        let not_throttled = Feedback::Pause {
            sent_at: now,
            received_at: now,
            resume_at: None,
            throttled: false,
        };
        assert_eq!(least_pause_until(&rule, &not_throttled), None);
    }

    /// A held key reads its pause until it ends; ended pauses leave the table.
    #[tokio::test(start_paused = true)]
    async fn held_pauses_end_and_leave_the_table() {
        let pauses = LocalPauses::default();
        let a = BucketKey::account(Some(AccountId::new("a")));
        let b = BucketKey::account(Some(AccountId::new("b")));
        let now = Instant::now();
        let second = Duration::from_secs(1);
        assert_eq!(pauses.held_until(&a, Instant::now), None);
        pauses.hold(&a, now + second, now);
        pauses.hold(&a, now + second / 2, now);
        assert_eq!(pauses.held_until(&a, || now), Some((now + second, now)));
        assert_eq!(pauses.held_until(&b, || now), None);
        pauses.hold(&b, now + 2 * second, now + second);
        assert_eq!(pauses.table.lock().unwrap().until.len(), 1, "a's ended");
        assert_eq!(pauses.held_until(&b, || now + 2 * second), None);
        assert!(pauses.table.lock().unwrap().until.is_empty());
        assert!(!pauses.any.load(Ordering::Relaxed));
        // Once every pause is past, any key's look empties the table: decisions take no
        // lock again.
        pauses.hold(&b, now + 3 * second, now);
        assert_eq!(pauses.held_until(&a, || now + 3 * second), None);
        assert!(!pauses.any.load(Ordering::Relaxed), "b's ended too");
    }
}
