//! Per-thread references to state every call of a layer shares.
//!
//! A response future that needs a layer's shared state after `call` returns holds a reference
//! to it. With one `Arc` for every call, every call and every drop writes the same reference
//! count, and when the threads of a runtime call at once that count's cache line moves between
//! their cores each time: tens of nanoseconds per request on a two-core machine. [`Lanes`]
//! keeps a few owning copies of the state's handle, each on cache lines of its own, and gives
//! each thread the same one, so the counts one thread writes are its own (threads beyond
//! [`LANES`] share lanes in turn, which is still correct, only slower).

use std::cell::Cell;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many lanes a [`Lanes`] has: more than the worker threads of a usual runtime.
pub const LANES: usize = 8;

/// One owning copy of a shared handle, alone on its cache lines (two: adjacent-line
/// prefetching pairs them).
#[repr(align(128))]
#[derive(Debug)]
pub struct Lane<T>(T);

impl<T> Deref for Lane<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// [`LANES`] owning copies of a handle (an `Arc` of a layer's state, say), one per thread.
#[derive(Debug)]
pub struct Lanes<T> {
    lanes: Box<[Arc<Lane<T>>]>,
}

impl<T: Clone> Lanes<T> {
    /// Lanes holding clones of `handle`.
    pub fn new(handle: T) -> Lanes<T> {
        Lanes {
            lanes: (0..LANES).map(|_| Arc::new(Lane(handle.clone()))).collect(),
        }
    }
}

impl<T> Lanes<T> {
    /// A reference for a future of the current thread: a write to this thread's lane's count
    /// only.
    #[inline]
    pub fn lane(&self) -> Arc<Lane<T>> {
        Arc::clone(&self.lanes[current()])
    }

    /// The handle, read without taking a reference.
    #[inline]
    pub fn get(&self) -> &T {
        &self.lanes[current()].0
    }
}

/// The current thread's lane, below [`LANES`]: threads take lanes in turn, once, and keep
/// them. Anything a layer keeps per thread (shards of a count, free lists) can be chosen by it,
/// so that one thread-local serves them all.
#[inline]
pub fn current() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        // Const-initialised and without a destructor: readable at any point of a thread's
        // life, with no lazy-initialisation check.
        static LANE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    LANE.with(|lane| match lane.get() {
        usize::MAX => {
            let taken = NEXT.fetch_add(1, Ordering::Relaxed) % LANES;
            lane.set(taken);
            taken
        }
        known => known,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_lane_and_threads_take_lanes_in_turn() {
        let lanes = Lanes::new(Arc::new(7));
        let here = lanes.lane();
        assert!(Arc::ptr_eq(&here, &lanes.lane()), "the same lane each time");
        assert_eq!(***here, 7);
        let others: Vec<_> = (0..LANES - 1)
            .map(|_| {
                let lanes = &lanes;
                std::thread::scope(|s| s.spawn(move || lanes.lane()).join().unwrap())
            })
            .collect();
        // Eight threads in a row take eight lanes (other tests' threads may take turns in
        // between, so only "not all one lane" is certain).
        assert!(others.iter().any(|lane| !Arc::ptr_eq(lane, &here)));
        assert!(std::mem::align_of::<Lane<Arc<u8>>>() >= 128);
    }

    #[test]
    fn a_thread_keeps_its_lane_number_and_its_lane_is_that_number() {
        let here = current();
        assert!(here < LANES);
        assert_eq!(current(), here, "the same lane each time");
        let lanes = Lanes::new(Arc::new(7));
        assert!(Arc::ptr_eq(&lanes.lane(), &lanes.lanes[here]));
        let there = std::thread::spawn(current).join().unwrap();
        assert!(there < LANES);
    }

    #[test]
    fn every_lane_holds_the_one_handle() {
        let handle = Arc::new(String::from("state"));
        let lanes = Lanes::new(Arc::clone(&handle));
        assert_eq!(Arc::strong_count(&handle), LANES + 1);
        assert!(Arc::ptr_eq(lanes.get(), &handle));
        drop(lanes);
        assert_eq!(Arc::strong_count(&handle), 1);
    }
}
