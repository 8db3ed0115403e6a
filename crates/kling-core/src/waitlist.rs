//! A FIFO of waiters in which any waiter may give up cheaply: the queue of the rate limiter's
//! keys and of the task slots' pools.
//!
//! Waiters join at the back with a ticket larger than any before it, so the queue is sorted by
//! ticket and a waiter finds itself by binary search (a linear scan made `n` waiters cost
//! `n²/2` steps: 100,000 queued creates took 3.6 s of CPU to join, `kling-bench scale`). One
//! that gives up behind the head leaves a tombstone (its waker taken) rather than shifting the
//! queue (100,000 creates giving up in random order took 1.25 s of CPU with shifting); the
//! tombstones that reach the front leave with the head, so the front is always a live waiter
//! and the list is empty exactly when nobody waits. Once tombstones outnumber the live waiters
//! (and [`MAX_TOMBSTONES_KEPT`]), they are dropped in one pass: a head that waits long (a
//! cooldown, a task that runs for minutes) keeps no more of them than there are waiters, each
//! pass halving the queue (amortised, one step per give-up).
//!
//! ```
//! use std::task::Waker;
//! use kling_core::waitlist::{Removed, WaitList};
//!
//! let mut list = WaitList::new();
//! for ticket in 0..3 {
//!     list.push_back(ticket, "create", Waker::noop().clone());
//! }
//! assert_eq!(list.remove(1), Removed::Behind);
//! assert_eq!(list.remove(0), Removed::Head);
//! // Ticket 1's tombstone left with the head: ticket 2 leads.
//! assert_eq!(list.front().map(|w| w.ticket), Some(2));
//! assert_eq!(list.waiting(), 1);
//! ```

use std::collections::VecDeque;
use std::task::Waker;

/// Tombstones a list keeps however few wait ([`WaitList::remove`]).
pub const MAX_TOMBSTONES_KEPT: usize = 64;

/// One waiter: its ticket, what it waits with, and its waker (`None` once it gave up).
#[derive(Debug)]
pub struct Waiter<T> {
    /// Larger than every ticket before it in the list.
    pub ticket: u64,
    /// What the waiter asks for (a create's weight, say).
    pub value: T,
    /// Woken when the waiter should look again; `None` for a tombstone.
    pub waker: Option<Waker>,
}

/// What [`WaitList::remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// The waiter led the list and left it: another may lead now.
    Head,
    /// The waiter stood behind the head and left a tombstone.
    Behind,
    /// No live waiter holds that ticket.
    NotWaiting,
}

/// Waiters in arrival order: see the [module docs](self).
#[derive(Debug)]
pub struct WaitList<T> {
    waiters: VecDeque<Waiter<T>>,
    /// Tombstones among `waiters`.
    gone: usize,
}

impl<T> Default for WaitList<T> {
    fn default() -> Self {
        WaitList::new()
    }
}

impl<T> WaitList<T> {
    /// An empty list (allocates nothing until a waiter joins).
    pub const fn new() -> Self {
        WaitList {
            waiters: VecDeque::new(),
            gone: 0,
        }
    }

    /// Live waiters.
    pub fn waiting(&self) -> usize {
        self.waiters.len() - self.gone
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// Records held, tombstones included (what the list's memory grows with).
    pub fn records(&self) -> usize {
        self.waiters.len()
    }

    /// Records the ring buffer has room for.
    pub fn capacity(&self) -> usize {
        self.waiters.capacity()
    }

    /// The head: the live waiter that arrived first.
    pub fn front(&self) -> Option<&Waiter<T>> {
        self.waiters.front()
    }

    /// Joins at the back. `ticket` must exceed every ticket in the list (checked in debug
    /// builds): the binary search relies on it.
    pub fn push_back(&mut self, ticket: u64, value: T, waker: Waker) {
        debug_assert!(self.waiters.back().is_none_or(|last| last.ticket < ticket));
        self.waiters.push_back(Waiter {
            ticket,
            value,
            waker: Some(waker),
        });
    }

    /// Where the live waiter holding `ticket` stands (0: the head).
    pub fn position(&self, ticket: u64) -> Option<usize> {
        let i = self
            .waiters
            .binary_search_by_key(&ticket, |w| w.ticket)
            .ok()?;
        self.waiters[i].waker.is_some().then_some(i)
    }

    /// The waiter at `index` (from [`position`](Self::position)).
    pub fn get(&self, index: usize) -> Option<&Waiter<T>> {
        self.waiters.get(index)
    }

    /// Gives the live waiter at `index` (from [`position`](Self::position)) `waker`, unless
    /// the one it holds wakes the same task; `false` when no live waiter stands there. The only
    /// change a caller may make to a waiter in place: its ticket orders the list, and a waker
    /// taken away would be a tombstone the list does not count.
    pub fn set_waker(&mut self, index: usize, waker: &Waker) -> bool {
        match self.waiters.get_mut(index).and_then(|w| w.waker.as_mut()) {
            Some(held) => {
                if !held.will_wake(waker) {
                    *held = waker.clone();
                }
                true
            }
            None => false,
        }
    }

    /// Takes the head out, and the tombstones that then lead the list.
    pub fn pop_front(&mut self) -> Option<Waiter<T>> {
        let head = self.waiters.pop_front()?;
        while self.waiters.front().is_some_and(|w| w.waker.is_none()) {
            self.waiters.pop_front();
            self.gone -= 1;
        }
        Some(head)
    }

    /// The waiter holding `ticket` gives up: the head leaves (with the tombstones behind it),
    /// any other leaves a tombstone.
    pub fn remove(&mut self, ticket: u64) -> Removed {
        match self.position(ticket) {
            None => Removed::NotWaiting,
            Some(0) => {
                self.pop_front();
                Removed::Head
            }
            Some(i) => {
                self.waiters[i].waker = None;
                self.gone += 1;
                if self.gone > MAX_TOMBSTONES_KEPT && self.gone > self.waiting() {
                    self.waiters.retain(|w| w.waker.is_some());
                    self.gone = 0;
                }
                Removed::Behind
            }
        }
    }

    /// The live waiters, head first.
    pub fn iter(&self) -> impl Iterator<Item = &Waiter<T>> {
        self.waiters.iter().filter(|w| w.waker.is_some())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn waker() -> Waker {
        Waker::noop().clone()
    }

    /// A waker is set in place on live waiters only: a tombstone (a waiter that gave up) stays
    /// one, so the list's count of them stays right and `pop_front` never underflows it.
    #[test]
    fn set_waker_updates_live_waiters_only() {
        let mut list = WaitList::new();
        for ticket in 0..3 {
            list.push_back(ticket, (), waker());
        }
        assert_eq!(list.remove(1), Removed::Behind);
        assert!(
            !list.set_waker(1, &waker()),
            "a tombstone is not brought back"
        );
        assert!(list.set_waker(2, &waker()));
        assert!(!list.set_waker(9, &waker()));
        assert_eq!(list.pop_front().map(|w| w.ticket), Some(0));
        assert_eq!(list.pop_front().map(|w| w.ticket), Some(2));
        assert!(list.pop_front().is_none());
    }

    proptest! {
        /// Against a plain ordered set: the same waiters, in the same order, whatever gives up
        /// when; the front is never a tombstone; tombstones stay bounded by the waiters.
        #[test]
        fn behaves_as_an_ordered_set_with_bounded_tombstones(
            steps in proptest::collection::vec((0u8..4, 0usize..400), 1..600),
        ) {
            let mut list = WaitList::new();
            let mut model = BTreeSet::new();
            let mut next = 0u64;
            for (op, pick) in steps {
                match op {
                    0 | 1 => {
                        list.push_back(next, next * 2, waker());
                        model.insert(next);
                        next += 1;
                    }
                    2 => {
                        let ticket = model.iter().nth(pick % model.len().max(1)).copied();
                        let ticket = ticket.unwrap_or(next + 7);
                        let expected = match model.first() {
                            _ if !model.contains(&ticket) => Removed::NotWaiting,
                            Some(&first) if first == ticket => Removed::Head,
                            _ => Removed::Behind,
                        };
                        prop_assert_eq!(list.remove(ticket), expected);
                        model.remove(&ticket);
                        // Once gone, a ticket is not waiting any more.
                        prop_assert_eq!(list.remove(ticket), Removed::NotWaiting);
                    }
                    _ => {
                        let popped = list.pop_front().map(|w| w.ticket);
                        prop_assert_eq!(popped, model.pop_first());
                    }
                }
                prop_assert_eq!(list.waiting(), model.len());
                prop_assert_eq!(list.is_empty(), model.is_empty());
                prop_assert!(list.front().is_none_or(|w| w.waker.is_some()));
                let live: Vec<u64> = list.iter().map(|w| w.ticket).collect();
                prop_assert_eq!(&live, &model.iter().copied().collect::<Vec<_>>());
                prop_assert!(list.iter().all(|w| w.value == w.ticket * 2));
                for (i, ticket) in model.iter().enumerate().take(5) {
                    let at = list.position(*ticket).unwrap();
                    prop_assert_eq!(list.get(at).unwrap().ticket, *ticket);
                    prop_assert_eq!(i == 0, at == 0);
                }
                prop_assert!(
                    list.records() <= 2 * model.len() + MAX_TOMBSTONES_KEPT + 1,
                    "{} records for {} waiters", list.records(), model.len()
                );
            }
        }
    }

    #[test]
    fn a_long_waiting_head_keeps_few_tombstones() {
        let mut list = WaitList::new();
        for ticket in 0..10_000 {
            list.push_back(ticket, (), waker());
        }
        // Everyone behind the head gives up, in arrival order.
        for ticket in 1..10_000 {
            assert_eq!(list.remove(ticket), Removed::Behind);
        }
        assert_eq!(list.waiting(), 1);
        assert!(
            list.records() <= MAX_TOMBSTONES_KEPT + 2,
            "{}",
            list.records()
        );
    }
}
