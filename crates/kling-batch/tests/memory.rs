//! How much memory the jobs of a file take once parsed: a run holds every job of its file
//! (100 000 jobs and more), so a job must take little more than its line.
//!
//! A test binary of its own: its allocator counts the bytes allocated and not yet freed, and
//! no other test allocates beside it.

#![allow(unsafe_code)] // a counting global allocator, as kling-bench's

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kling_batch::jobs::parse_jobs;

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only a count is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The README's line (`## Memory`): 2048 of them parsed take under 2.5 times their bytes,
/// where a body parsed into `serde_json::Value`s took about 7 times.
#[test]
fn a_parsed_job_takes_little_more_than_its_line() {
    let n = 2048;
    let text: String = (1..=n)
        .map(|i| {
            format!(
                "{{\"id\":\"job-{i}\",\"prompt\":\"shot {i}: a paper boat sailing down a rainy \
                 street at dusk, cinematic, 35mm\",\"duration\":\"5\",\"aspect_ratio\":\"16:9\",\
                 \"mode\":\"std\"}}\n"
            )
        })
        .collect();
    let before = LIVE.load(Ordering::SeqCst);
    let (jobs, errors) = parse_jobs(&text);
    let held = LIVE.load(Ordering::SeqCst).saturating_sub(before);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(jobs.len(), n);
    let per_job = held as f64 / n as f64;
    let per_line = text.len() as f64 / n as f64;
    assert!(
        per_job < 2.5 * per_line,
        "{per_job:.0} bytes per job for a line of {per_line:.0} bytes"
    );
    drop(jobs);
}
