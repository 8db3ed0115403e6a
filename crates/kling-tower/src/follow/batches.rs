//! The new-style tasks every call of a follower (and of its clones) is waiting for, so that one
//! batch query asks about many of them: which call asks, and about which tasks.
//!
//! No call waits on another for long. A call asks when one of its own tasks is due, about its
//! due tasks first, then other calls' due tasks, then tasks due soon (within the policy's
//! shortest interval), up to a batch. The tasks it asks about are marked as being asked, so
//! that their own calls do not ask again while the answer is on its way; a mark older than the
//! takeover time (four times the policy's longest interval) is ignored, so a query that
//! hangs, or a call that stops polling its future, holds other calls' tasks up for that long at
//! most. (Longer than the interval: a query waiting its turn at a busy rate limiter is not
//! hung, and each takeover sends one more.) A task whose id a query on its way asks about
//! (another call following the same task) takes that query's mark rather than a second query.
//! The sending call stops waiting for its own query only when its tasks have ended or another
//! call's answer has made one due again. A call that ends drops its mark with its query.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Tracked, later};

#[derive(Debug, Default)]
pub(super) struct Batches {
    state: Mutex<BatchState>,
}

#[derive(Debug, Default)]
pub(super) struct BatchState {
    /// Each call's tasks, by a key of their own (two calls may follow the same task), in the
    /// order they were followed: tasks due together go into batches, and calls are woken, in
    /// that order, the same from run to run (a hash map's order changed with its random
    /// hasher, and with it which tasks a full batch took).
    pub(super) tracked: BTreeMap<u64, Tracked>,
    next_key: u64,
    next_claim: u64,
    /// An external id a successful batch answer left out has met `1203` (or a successful answer
    /// listing no task) asked about alone: the server leaves out the ids it does not list
    /// rather than refuse their batch, so its `1203` to a batch of them means it lists none.
    /// (An id left out alone proves nothing: a page limit or an id echoed in another case
    /// leaves out a listed one.)
    pub(super) lists_found_only: bool,
}

impl BatchState {
    /// Adds a call's task; its key.
    pub(super) fn insert(&mut self, tracked: Tracked) -> u64 {
        let key = self.next_key;
        self.next_key += 1;
        self.tracked.insert(key, tracked);
        key
    }
}

/// Whether a task is due for a query: not ended, its time come, and not in a query on its way
/// (unless that query has been out longer than `takeover`).
pub(super) fn is_due(t: &Tracked, now: Instant, takeover: Duration) -> bool {
    t.result.is_none()
        && t.next_at <= now
        && t.asked
            .is_none_or(|(_, since)| later(since, takeover) <= now)
}

/// Whether a task's next query is its last before its deadline, due within `slack`, and its
/// last answer came a shortest interval (`lead`) ago at least: a batch sent now takes it along
/// rather than leave it a query of its own later (its answer, within `slack` of the last call,
/// schedules no other). Not a task backing off from a failed query (the backoff spares a
/// failing server), nor one never answered (its first query is its last: not before its time).
pub(super) fn joins_as_last_query(
    t: &Tracked,
    now: Instant,
    lead: Duration,
    slack: Duration,
) -> bool {
    t.errors == 0
        && t.next_at == t.last_call
        && t.last_call < later(now, slack)
        && t.answered_at.is_some_and(|at| later(at, lead) <= now)
}

/// When a pending task next needs its call: its next query (or, while a query about it is on
/// its way, the takeover time), or its deadline, whichever comes first.
pub(super) fn next_wake(t: &Tracked, takeover: Duration) -> Instant {
    let next = match t.asked {
        Some((_, since)) => t.next_at.max(later(since, takeover)),
        None => t.next_at,
    };
    next.min(t.deadline_at)
}

impl Batches {
    pub(super) fn lock(&self) -> MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next batch query of the call whose tasks are `mine`, if one of them is due: its due
    /// tasks (soonest first), then other calls' due tasks, then tasks due within `soon`
    /// (soonest first, one answered a moment before too: it costs no request, and its next
    /// query is then an interval after this answer; a last query before the deadline too, whose
    /// answer then stands for it; not those backing off from a failed query), then tasks whose
    /// last query before their deadline is due within `last_slack` (see
    /// [`joins_as_last_query`]), each id once, up to `batch_size`; ties in the order the tasks
    /// were followed. A task a batch answer left out when due ([`Tracked::alone`]) is asked
    /// about alone.
    /// The tasks asked about are marked until the answer is applied or the [`Claimed`] is
    /// dropped. An id a query on its way asks about is left out (its tasks take that query's
    /// mark and wait for its answer), so no claim overwrites another's recent mark.
    ///
    /// The query is given up at the latest deadline among the tasks it asks about, but no later
    /// than the last of the calling call's own: a call does not outlive its own tasks to wait
    /// for other calls' answers.
    pub(super) fn claim(
        &self,
        mine: &[u64],
        now: Instant,
        batch_size: usize,
        takeover: Duration,
        soon: Duration,
        last_slack: Duration,
    ) -> Option<Claimed<'_>> {
        let mut state = self.lock();
        // Ids a query on its way asks about (a mark younger than the takeover time): no second
        // query for them; a task of ours among them waits for that answer too.
        let in_flight: HashMap<(bool, String), (u64, Instant)> = state
            .tracked
            .values()
            .filter(|t| t.result.is_none())
            .filter_map(|t| match t.asked {
                Some(mark) if later(mark.1, takeover) > now => Some((asked_as(t), mark)),
                _ => None,
            })
            .collect();
        for key in mine {
            if let Some(t) = state.tracked.get_mut(key)
                && is_due(t, now, takeover)
                && let Some(&mark) = in_flight.get(&asked_as(t))
            {
                t.asked = Some(mark);
            }
        }
        let mut own: Vec<&Tracked> = mine
            .iter()
            .filter_map(|key| state.tracked.get(key))
            .filter(|t| is_due(t, now, takeover))
            .collect();
        own.sort_by_key(|t| t.next_at);
        let first: &Tracked = own.first()?;
        // Task ids or external ids, as the soonest due task of ours is known: Kling takes no
        // mix, so the other kind waits for the next query.
        let external = first.task.external;
        own.retain(|t| t.task.external == external);
        let own_until = mine
            .iter()
            .filter_map(|key| state.tracked.get(key))
            .filter(|t| t.result.is_none())
            .map(|t| t.deadline_at)
            .max()
            .unwrap_or(now);

        let ids: Vec<String> = if first.alone {
            vec![first.task.id.clone()]
        } else {
            // Everyone else's candidates: due ones first, then those due soon.
            let horizon = later(now, soon);
            let mut others: Vec<&Tracked> = state
                .tracked
                .values()
                .filter(|t| t.result.is_none() && !t.alone && t.task.external == external)
                .filter(|t| {
                    t.next_at <= now
                        || (t.next_at < horizon && t.errors == 0)
                        || joins_as_last_query(t, now, soon, last_slack)
                })
                .filter(|t| !in_flight.contains_key(&asked_as(t)))
                .collect();
            others.sort_by_key(|t| (t.next_at > now, t.next_at));
            let mut ids: Vec<String> = Vec::with_capacity(batch_size);
            let mut seen: HashSet<&str> = HashSet::with_capacity(batch_size);
            for t in own.iter().filter(|t| !t.alone).chain(others.iter()) {
                if ids.len() == batch_size {
                    break;
                }
                if seen.insert(&t.task.id) {
                    ids.push(t.task.id.clone());
                }
            }
            ids
        };

        let claim = state.next_claim;
        state.next_claim += 1;
        let mut until = now;
        {
            let asked: HashSet<&str> = ids.iter().map(String::as_str).collect();
            for t in state.tracked.values_mut() {
                if t.result.is_none() && t.task.external == external && asked.contains(&*t.task.id)
                {
                    t.asked = Some((claim, now));
                    until = until.max(t.deadline_at);
                }
            }
        }
        Some(Claimed {
            batches: self,
            claim,
            at: now,
            external,
            ids,
            until: until.min(own_until),
        })
    }

    /// Applies a claimed query's answer, through `settle`, to every pending task with an id it
    /// asked about, and takes the claim's marks off.
    pub(super) fn answer(&self, claimed: &Claimed<'_>, mut settle: impl FnMut(&mut Tracked)) {
        let asked: HashSet<&str> = claimed.ids.iter().map(String::as_str).collect();
        let mut state = self.lock();
        for t in state.tracked.values_mut() {
            if t.result.is_none() && claimed.asks(t, &asked) {
                settle(t);
                t.answers = t.answers.wrapping_add(1);
            }
            if t.asked.is_some_and(|(claim, _)| claim == claimed.claim) {
                t.asked = None;
            }
        }
    }
}

/// What a task is asked about by in a batch query: whether its id is an external id, and the
/// id. A task id and an external id that read the same are different tasks.
fn asked_as(t: &Tracked) -> (bool, String) {
    (t.task.external, t.task.id.clone())
}

/// A batch query a call sends: the ids it asks about (external ids, or task ids), and when it
/// gives up.
pub(super) struct Claimed<'a> {
    batches: &'a Batches,
    pub(super) claim: u64,
    /// When it was claimed: a task due later only rode along.
    pub(super) at: Instant,
    /// Whether `ids` are external ids (`external_task_ids=`), not task ids.
    pub(super) external: bool,
    pub(super) ids: Vec<String>,
    pub(super) until: Instant,
}

impl Claimed<'_> {
    /// Whether it asks about `t` (`asked`: its `ids`).
    pub(super) fn asks(&self, t: &Tracked, asked: &HashSet<&str>) -> bool {
        t.task.external == self.external && asked.contains(t.task.id.as_str())
    }
}

impl Drop for Claimed<'_> {
    /// Answered, given up, or dropped half-way (the sending call was dropped): the marks come
    /// off, and the calls whose tasks it asked about (answered, or waiting for the answer) look
    /// again. Only those: waking every call at every answer made following `n` tasks cost
    /// `n` wakes per query.
    fn drop(&mut self) {
        let mut wakes: Vec<Arc<Notify>> = Vec::new();
        {
            let asked: HashSet<&str> = self.ids.iter().map(String::as_str).collect();
            let mut state = self.batches.lock();
            for t in state.tracked.values_mut() {
                let marked = t.asked.is_some_and(|(claim, _)| claim == self.claim);
                if marked {
                    t.asked = None;
                }
                if marked || self.asks(t, &asked) {
                    wakes.push(t.wake.clone());
                }
            }
        }
        wake_each(wakes);
    }
}

/// Wakes each call once (a call's tasks share its `Notify`), in the order given: the order
/// the woken calls then run in, which must not follow where their `Notify`s were allocated.
pub(super) fn wake_each(wakes: Vec<Arc<Notify>>) {
    let mut woken: HashSet<*const Notify> = HashSet::with_capacity(wakes.len());
    for wake in wakes {
        if woken.insert(Arc::as_ptr(&wake)) {
            wake.notify_waiters();
        }
    }
}

/// A call's tasks in [`Batches`]: taken out when the call ends, however it ends.
pub(super) struct Registered<'a> {
    pub(super) batches: &'a Batches,
    pub(super) keys: Vec<u64>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut state = self.batches.lock();
        for key in &self.keys {
            state.tracked.remove(key);
        }
    }
}
