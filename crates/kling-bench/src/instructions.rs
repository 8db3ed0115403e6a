//! Instructions per request, counted by `valgrind --tool=callgrind` rather than timed: the
//! overhead section's subjects (one driver task), with figures that are the same on any machine
//! of the same kind whatever else it is doing. A shared machine's times move by two or three
//! times between hours (BENCHMARKS.md); a count does not, so it is how a change to a layer's own
//! path is judged when the times cannot be.
//!
//! Each subject runs twice in a child process (`kling-bench profile <name> <lives> 1`, then with
//! twice the lives), and the difference over the extra requests leaves out all a run does once:
//! start-up, the fixtures, the warm-up.
//!
//! What a count cannot see: cache misses, and work in the kernel (a thread parking and being
//! woken, which tower's `Buffer` does to hand each request to its worker). So the times of the
//! overhead section stay the comparison with tower's stack; a count's "× tower" only says how
//! much work each does on the CPU's side of it.

use std::fmt;
use std::path::Path;
use std::process::Command;

use crate::overhead;

/// One subject's count.
#[derive(Clone, Debug)]
pub struct Row {
    /// The subject, as the overhead section names it.
    pub name: String,
    /// The subject its added count is taken over, if any.
    pub baseline: Option<&'static str>,
    /// Instructions per request (create and query alike, averaged over both).
    pub per_request: f64,
}

/// Why a count could not be taken.
#[derive(Debug)]
pub enum Error {
    /// `valgrind` could not be started (not installed, say: `apt-get install valgrind`).
    Valgrind(std::io::Error),
    /// The profiled run failed.
    Failed {
        /// The subject.
        name: String,
        /// What valgrind and the run wrote on stderr.
        stderr: String,
    },
    /// valgrind's output held no "Collected" total.
    NoCount {
        /// The subject.
        name: String,
        /// What valgrind wrote on stderr.
        stderr: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Valgrind(e) => write!(
                f,
                "cannot start valgrind ({e}): install it (`apt-get install valgrind`)"
            ),
            Error::Failed { name, stderr } => {
                write!(f, "the profiled run of `{name}` failed:\n{stderr}")
            }
            Error::NoCount { name, stderr } => write!(
                f,
                "valgrind printed no instruction total for `{name}`:\n{stderr}"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// Counts every overhead subject through the `kling-bench` binary at `exe`, the difference
/// between `lives` and `2 × lives` create+query lives.
pub fn run(exe: &Path, lives: usize, log: &mut dyn FnMut(&str)) -> Result<Vec<Row>, Error> {
    let subjects = overhead::subject_names();
    let subjects: Vec<(&str, Option<&'static str>)> = subjects
        .iter()
        .map(|(name, baseline)| (name.as_str(), *baseline))
        .collect();
    count_each(exe, &subjects, lives, log)
}

/// Counts the overhead subjects named in `names` (exactly), as [`run`] does.
pub fn run_subjects(
    exe: &Path,
    names: &[&str],
    lives: usize,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<Row>, Error> {
    let all = overhead::subject_names();
    let subjects: Vec<(&str, Option<&'static str>)> = names
        .iter()
        .map(|&name| {
            let baseline = all.iter().find(|(n, _)| n == name).and_then(|(_, b)| *b);
            (name, baseline)
        })
        .collect();
    count_each(exe, &subjects, lives, log)
}

/// Counts each of `subjects` (a name and its baseline).
fn count_each(
    exe: &Path,
    subjects: &[(&str, Option<&'static str>)],
    lives: usize,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<Row>, Error> {
    let lives = lives.max(1);
    let mut rows = Vec::with_capacity(subjects.len());
    for &(name, baseline) in subjects {
        log(&format!("instructions: {name}"));
        let once = count(exe, name, lives)?;
        let twice = count(exe, name, 2 * lives)?;
        // `lives` more lives, two requests each.
        let per_request = twice.saturating_sub(once) as f64 / (2 * lives) as f64;
        rows.push(Row {
            name: name.to_owned(),
            baseline,
            per_request,
        });
    }
    Ok(rows)
}

/// The instructions of one profiled run of `name` over `lives` lives.
fn count(exe: &Path, name: &str, lives: usize) -> Result<u64, Error> {
    let output = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(exe)
        .args(["profile", name, &lives.to_string(), "1"])
        .output()
        .map_err(Error::Valgrind)?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    // `profile` prints what it measured on stdout, and fails for a name no subject has.
    if !output.status.success() || output.stdout.is_empty() {
        return Err(Error::Failed {
            name: name.to_owned(),
            stderr,
        });
    }
    collected(&stderr).ok_or_else(|| Error::NoCount {
        name: name.to_owned(),
        stderr,
    })
}

/// The total in callgrind's closing line `==PID== Collected : N`.
fn collected(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|line| {
        let (_, total) = line.split_once("Collected :")?;
        total.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_read_from_callgrinds_closing_lines() {
        let stderr = "==7== Callgrind, a call-graph generating cache profiler\n\
                      ==7== Events    : Ir\n\
                      ==7== Collected : 160474650\n\
                      ==7==\n\
                      ==7== I   refs:      160,474,650\n";
        assert_eq!(collected(stderr), Some(160_474_650));
        assert_eq!(collected("==7== I   refs:      160,474,650\n"), None);
        assert_eq!(collected("==7== Collected : many\n"), None);
    }
}
