//! CPU time from `/proc`: robust where wall-clock time is not (a shared, loaded machine).

use std::time::Duration;

/// CPU time of one thread's `/proc/.../schedstat` (its first field, nanoseconds on the CPU).
fn schedstat(path: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// CPU time the whole process has used (every thread, alive now), nanosecond resolution.
pub fn process() -> Duration {
    threads(|_| true)
}

/// CPU time of the threads whose name (`/proc/self/task/*/comm`) starts with `prefix`.
pub fn named(prefix: &str) -> Duration {
    threads(|name| name.starts_with(prefix))
}

fn threads(keep: impl Fn(&str) -> bool) -> Duration {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut total = 0u64;
    for entry in dir.flatten() {
        let path = entry.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if keep(name.trim_end()) {
            total += schedstat(&path.join("schedstat")).unwrap_or(0);
        }
    }
    Duration::from_nanos(total)
}

/// CPU time of the calling thread, exact to the nanosecond.
///
/// `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`, not `/proc/thread-self/schedstat`: a reading of
/// the file costs the thread some 8 µs of its own time (an open and a read), which a timed
/// section then counted as its own; the clock costs tens of nanoseconds. Falls back to
/// schedstat if the clock cannot be read.
#[allow(unsafe_code)]
pub fn thread() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable `timespec` for the call's whole duration, and
    // `CLOCK_THREAD_CPUTIME_ID` is a clock every Linux kernel this crate runs on supports; the
    // call writes nothing else.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    match (read, u64::try_from(now.tv_sec), u32::try_from(now.tv_nsec)) {
        (0, Ok(secs), Ok(nanos)) => Duration::new(secs, nanos),
        _ => Duration::from_nanos(
            schedstat(std::path::Path::new("/proc/thread-self/schedstat")).unwrap_or(0),
        ),
    }
}

/// The median of some samples (the mean of the middle two for an even count); 0 for none.
pub fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// The `q`-quantile (0..=1) of samples, nearest rank; 0 for none.
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

/// How long one cache line takes to pass from one thread to another, in ns: two threads hand
/// an atomic back and forth (each waits for the other's write, then writes), the median of 9
/// batches of `hands` hand-overs (20,000 in the published run). On these machines it is not a
/// constant: 23–30 ns in most runs, 167–203 ns at the start of three overhead runs.
/// When it is slow, every line the 64-task runs share between the workers costs more, so the
/// overhead section measures it before and after its rounds (`kling-bench handover` alone).
pub fn line_handover_ns(hands: u64) -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The atomic, alone on its lines.
    #[repr(align(128))]
    struct Line(AtomicU64);

    // A runtime's workers that just ran spin a while before they park; with two vCPUs, one of
    // them would take turns with a hand-over thread.
    std::thread::sleep(Duration::from_millis(20));
    let line = Line(AtomicU64::new(0));
    let spawned = std::sync::Mutex::new(Vec::new());
    let batches: Vec<f64> = (0..9)
        .map(|_| {
            line.0.store(0, Ordering::Relaxed);
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for first in [0, 1] {
                    let (line, spawned) = (&line, &spawned);
                    std::thread::Builder::new()
                        .name(HANDOVER_THREAD.to_owned())
                        .spawn_scoped(s, move || {
                            // `<pid>/task/<tid>`, relative to /proc.
                            if let Ok(own) = std::fs::read_link("/proc/thread-self") {
                                let own = std::path::Path::new("/proc").join(own);
                                spawned.lock().unwrap_or_else(|e| e.into_inner()).push(own);
                            }
                            let mut mine = first;
                            while mine < 2 * hands {
                                let mut spins = 0u32;
                                while line.0.load(Ordering::Acquire) != mine {
                                    // The other thread may not be running: let it.
                                    spins += 1;
                                    if spins.is_multiple_of(4096) {
                                        std::thread::yield_now();
                                    }
                                    std::hint::spin_loop();
                                }
                                line.0.store(mine + 1, Ordering::Release);
                                mine += 2;
                            }
                        })
                        .expect("a thread");
                }
            });
            start.elapsed().as_nanos() as f64 / (2 * hands.max(1)) as f64
        })
        .collect();
    wait_until_gone(&spawned.into_inner().unwrap_or_else(|e| e.into_inner()));
    median(&batches)
}

/// The name of [`line_handover_ns`]'s threads.
const HANDOVER_THREAD: &str = "kb-handover";

/// Waits (at most a second) until these threads' entries (`/proc/<pid>/task/<tid>`) are gone.
/// A joined thread stays listed for a moment while it finishes exiting, and [`process`] sums
/// the threads listed: one that left between a measurement's two readings would take its time
/// with it and could make the difference negative.
fn wait_until_gone(tasks: &[std::path::PathBuf]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < deadline && tasks.iter().any(|task| task.exists()) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether a thread of this name is listed in `/proc/self/task`.
#[cfg(test)]
fn named_listed(name: &str) -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|dir| {
        dir.flatten().any(|entry| {
            std::fs::read_to_string(entry.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threads_clock_is_cheap_to_read_and_never_runs_ahead_of_the_wall() {
        // A thousand readings back to back: the clock costs tens of nanoseconds a reading, so
        // a timed batch of decisions counts its own work and not the reading's. schedstat took
        // a file's open and read, some 8 µs of the thread's own time, inside every batch: 8 ms
        // for these. The bound leaves room for a debug build on a loaded machine (1.3 ms seen
        // during a CI run with a build beside it) and still tells the two apart.
        let start = thread();
        for _ in 0..1_000 {
            std::hint::black_box(thread());
        }
        let readings = thread().saturating_sub(start);
        assert!(
            readings < Duration::from_millis(4),
            "{readings:?} for 1,000 readings"
        );

        let wall = std::time::Instant::now();
        let cpu = thread();
        while wall.elapsed() < Duration::from_micros(100) {
            std::hint::black_box(wall.elapsed());
        }
        let spent = thread().saturating_sub(cpu);
        let passed = wall.elapsed();
        assert!(spent > Duration::ZERO, "{spent:?}");
        // One thread cannot spend more CPU time than time has passed (the process clock could).
        assert!(spent <= passed, "{spent:?} > {passed:?}");
    }

    /// The hand-over's threads are gone when it returns, so a CPU reading taken next cannot
    /// lose their time.
    #[test]
    fn the_handover_threads_are_gone_when_it_returns() {
        for _ in 0..20 {
            assert!(line_handover_ns(200) > 0.0);
            assert!(!named_listed(HANDOVER_THREAD));
        }
    }
}
