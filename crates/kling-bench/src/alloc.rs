//! A counting global allocator: allocations per request and bytes per waiter.
//!
//! The workspace denies `unsafe_code`; this module is one of kling-bench's two exceptions (the
//! other is `cpu::thread`'s clock call), because a `GlobalAlloc` implementation is `unsafe` by
//! definition. It only forwards to the system allocator and adds to a few atomic counters (and
//! keeps a high-water mark with `fetch_max`), and only while counting is switched on, so the
//! timed runs pay one relaxed load per allocation and nothing else.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// The largest block glibc's allocator serves from its per-thread cache (`tcache`) on a 64-bit
/// target: a larger one comes from its arena's bins, at about 180 instructions more for the
/// `malloc` and its `free`, and an arena lock on each `free` (kling-retry's CHANGELOG).
pub const THREAD_CACHE_MAX_BYTES: usize = 1_032;

/// The system allocator, counting while [`Counting::start`] is in force.
#[derive(Debug)]
pub struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);
static LARGE: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract;
// the counters are plain atomics that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            if layout.size() > THREAD_CACHE_MAX_BYTES {
                LARGE.fetch_add(1, Ordering::Relaxed);
            }
            let size = layout.size() as i64;
            PEAK.fetch_max(
                LIVE.fetch_add(size, Ordering::Relaxed) + size,
                Ordering::Relaxed,
            );
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ON.load(Ordering::Relaxed) {
            LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
            if new_size > THREAD_CACHE_MAX_BYTES {
                LARGE.fetch_add(1, Ordering::Relaxed);
            }
            let grown = new_size as i64 - layout.size() as i64;
            PEAK.fetch_max(
                LIVE.fetch_add(grown, Ordering::Relaxed) + grown,
                Ordering::Relaxed,
            );
        }
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What the allocator counted between [`Counting::start`] and [`Counting::stop`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Allocations (and reallocations).
    pub allocs: u64,
    /// Bytes asked for.
    pub bytes: u64,
    /// Net bytes still allocated (allocated minus freed while counting).
    pub live: i64,
    /// The highest `live` reached while counting (the allocator's high-water mark, kept with
    /// a `fetch_max` on every allocation: not sampled).
    pub peak: i64,
    /// Allocations (and reallocations) of more than [`THREAD_CACHE_MAX_BYTES`].
    pub large: u64,
}

impl Counting {
    /// Zeroes the counters and starts counting (process-wide: run nothing else meanwhile).
    pub fn start() {
        ALLOCS.store(0, Ordering::Relaxed);
        BYTES.store(0, Ordering::Relaxed);
        LIVE.store(0, Ordering::Relaxed);
        PEAK.store(0, Ordering::Relaxed);
        LARGE.store(0, Ordering::Relaxed);
        ON.store(true, Ordering::SeqCst);
    }

    /// What was counted so far, still counting.
    pub fn read() -> Counts {
        Counts {
            allocs: ALLOCS.load(Ordering::Relaxed),
            bytes: BYTES.load(Ordering::Relaxed),
            live: LIVE.load(Ordering::Relaxed),
            peak: PEAK.load(Ordering::Relaxed),
            large: LARGE.load(Ordering::Relaxed),
        }
    }

    /// Stops counting and returns the counts.
    pub fn stop() -> Counts {
        ON.store(false, Ordering::SeqCst);
        Counting::read()
    }
}
