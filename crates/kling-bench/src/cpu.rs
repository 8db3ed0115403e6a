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

/// CPU time of the calling thread.
pub fn thread() -> Duration {
    Duration::from_nanos(
        schedstat(std::path::Path::new("/proc/thread-self/schedstat")).unwrap_or(0),
    )
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
