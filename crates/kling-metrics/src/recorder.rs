//! Which `metrics` recorder a call records to, told apart cheaply, so a call with no recorder
//! installed records nothing and a call to the global recorder uses handles registered once.
//!
//! The `metrics` facade hands out the current recorder (a thread's local one, else the global
//! one, else its no-op) but does not say which it is. This module learns the recorder a thread
//! *without* a local one sees — call it the default: the no-op until a global recorder is
//! installed, that recorder after — by asking on a fresh thread, and learns whether the default
//! is the no-op from the first duration recorded through it: the no-op has no size, its
//! histogram never asks for its value (see [`Probe`]; a real recorder that drops the duration
//! histogram, a filter, has a size, so its counter is still recorded), and it is the facade's
//! own static. A global recorder is moved into a box by `metrics::set_global_recorder`, and a
//! box of a zero-sized value sits at a dangling address equal to its alignment, where no
//! static is: so a zero-sized global recorder whose histograms are no-ops (one that forwards
//! only counters to statics) is still taken for a real one, and its counters are recorded. A
//! call whose recorder is the default then knows, with one thread-local read and two loads:
//!
//! - the default is the no-op: nothing to record ([`Target::Nothing`]);
//! - the default is a real recorder: it is the global one, installed for good, so handles
//!   registered from it stay valid ([`Target::Global`]);
//! - anything else (a thread's local recorder, a global recorder installed since the default
//!   was learned, or a default not yet classified): every metric is registered on each call,
//!   as the facade's macros do ([`Target::Each`]). The default is learned again at most every
//!   4,096 such calls (the first such call after a new default), so a global recorder installed
//!   after the layer was built gets its handles kept within that many calls (each recorded
//!   correctly meanwhile).
//!
//! A recorder is told apart by its address: only a zero-sized local recorder can share the
//! address of the global one, and would be taken for it.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use metrics::Recorder;

/// Where a call's metrics go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// No recorder is installed: nothing is recorded.
    Nothing,
    /// The global recorder: handles registered once are reused.
    Global,
    /// Another recorder, or one not classified yet: registered on each call.
    Each,
}

/// The default recorder's address shifted left by two, with its kind in the low two bits;
/// 0 before it is first learned.
static DEFAULT: AtomicU64 = AtomicU64::new(0);
/// Calls that found another recorder than the default (or none known), to learn it again now
/// and then; reset when a new default is learned.
static MISSES: AtomicU32 = AtomicU32::new(0);
/// Every how many such calls the default is learned again.
const RELEARN_EVERY: u32 = 4096;

const UNKNOWN: u64 = 0;
const NOOP: u64 = 1;
const REAL: u64 = 2;
const KIND: u64 = 0b11;

fn address(recorder: &dyn Recorder) -> u64 {
    (recorder as *const dyn Recorder).cast::<()>() as usize as u64
}

/// The current recorder's address (a thread-local read and, without a local recorder, a load).
#[inline]
fn current() -> u64 {
    metrics::with_recorder(address)
}

/// Learns the default recorder on a fresh thread (which has no local recorder), keeping what
/// is known about it when it did not change. Blocks the caller for the thread's life (tens of
/// microseconds), once and then at most once per [`RELEARN_EVERY`] calls to another recorder;
/// where no thread can be started, nothing is learned and every call registers its metrics.
fn learn() -> u64 {
    let default = std::thread::Builder::new()
        .name("kling-metrics-probe".into())
        .spawn(current)
        .ok()
        .and_then(|probe| probe.join().ok());
    let Some(default) = default else {
        return DEFAULT.load(Ordering::Acquire);
    };
    let mut known = DEFAULT.load(Ordering::Acquire);
    loop {
        if known != 0 && known >> 2 == default {
            return known;
        }
        let next = (default << 2) | UNKNOWN;
        match DEFAULT.compare_exchange(known, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                // A new default (a global recorder installed): the next call to another
                // recorder learns again at once.
                MISSES.store(0, Ordering::Relaxed);
                return next;
            }
            Err(actual) => known = actual,
        }
    }
}

/// Where the metrics of a call starting now go. Inlined: the current recorder is the
/// classified default on almost every call; the rest is out of line.
#[inline]
pub(crate) fn target() -> Target {
    let current = current();
    let known = DEFAULT.load(Ordering::Acquire);
    match classified(current, known) {
        Some(target) => target,
        None => target_otherwise(current, known),
    }
}

/// The target when `current` is the default `known` holds and that is classified (nothing
/// known, 0, is unclassified).
#[inline]
fn classified(current: u64, known: u64) -> Option<Target> {
    if known >> 2 != current {
        return None;
    }
    match known & KIND {
        NOOP => Some(Target::Nothing),
        REAL => Some(Target::Global),
        _ => None,
    }
}

/// [`target`] when the current recorder is not the classified default.
#[inline(never)]
fn target_otherwise(current: u64, mut known: u64) -> Target {
    // Rate-limited even when nothing is known yet: where no thread starts, learning fails.
    let relearn = (known == 0 || known >> 2 != current)
        && MISSES
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(RELEARN_EVERY);
    if relearn {
        known = learn();
    }
    if known >> 2 != current {
        return Target::Each;
    }
    match known & KIND {
        NOOP => Target::Nothing,
        REAL => Target::Global,
        _ => Target::Each,
    }
}

/// Classifies `recorder` if it is the default and not classified yet: `asked` says whether a
/// histogram it registered asked for the value it recorded. Only a recorder of no size whose
/// histogram did not ask is the no-op.
pub(crate) fn classify(recorder: &dyn Recorder, asked: bool) {
    let known = DEFAULT.load(Ordering::Acquire);
    if known & KIND != UNKNOWN || known >> 2 != address(recorder) || known == 0 {
        return;
    }
    let kind = kind_of(recorder, asked);
    // Lost only to a newer default, which is classified by a later call.
    let _ = DEFAULT.compare_exchange(known, known | kind, Ordering::AcqRel, Ordering::Relaxed);
}

/// Whether a recorder whose histogram asked (or not) for its value is real or the no-op: only
/// one of no size, whose histogram did not ask, at the address of a static. A zero-sized
/// global recorder was boxed by `metrics::set_global_recorder`, and a box of no size points at
/// its alignment (`NonNull::dangling`), where no static lies; the facade's no-op is a static.
/// (Should std ever place such boxes elsewhere, a recorder like that would be taken for the
/// no-op again, as before this test; the no-op is never taken for a real one.)
fn kind_of(recorder: &dyn Recorder, asked: bool) -> u64 {
    let boxed_without_size = address(recorder) == std::mem::align_of_val(recorder) as u64;
    if asked || std::mem::size_of_val(recorder) != 0 || boxed_without_size {
        REAL
    } else {
        NOOP
    }
}

/// A value handed to a histogram that notes whether the histogram asked for it: a no-op
/// recorder's histogram never does.
pub(crate) struct Probe<'a, V> {
    pub(crate) value: V,
    pub(crate) asked: &'a Cell<bool>,
}

impl<V: metrics::IntoF64> metrics::IntoF64 for Probe<'_, V> {
    fn into_f64(self) -> f64 {
        self.asked.set(true);
        self.value.into_f64()
    }
}

#[cfg(test)]
mod tests {
    use metrics_util::debugging::DebuggingRecorder;

    use super::*;

    /// The inlined answer for a classified default is the full path's, and it leaves every
    /// other case to the full path (only cases that learn nothing are run through it: the
    /// others start a thread and change what is known).
    #[test]
    fn the_classified_default_is_answered_as_the_full_path_answers_it() {
        for address in [8_u64, 0x7f00_dead_bee0, 1 << 40] {
            for kind in [UNKNOWN, NOOP, REAL] {
                let known = (address << 2) | kind;
                let fast = classified(address, known);
                assert_eq!(fast.is_some(), kind != UNKNOWN, "{kind}");
                assert_eq!(
                    fast.unwrap_or(Target::Each),
                    target_otherwise(address, known),
                    "{kind}"
                );
                // Another recorder, or nothing known: the full path decides.
                assert_eq!(classified(address + 8, known), None);
                assert_eq!(classified(address, 0), None);
            }
        }
        assert_eq!(classified(0, 0), None, "nothing known yet");
    }

    #[test]
    fn a_probe_tells_a_real_histogram_from_a_no_op_one() {
        let key = metrics::Key::from_static_name("probe_test");
        let meta = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);
        let asked = Cell::new(false);
        metrics::NoopRecorder
            .register_histogram(&key, &meta)
            .record(Probe {
                value: 1.0,
                asked: &asked,
            });
        assert!(!asked.get());
        DebuggingRecorder::new()
            .register_histogram(&key, &meta)
            .record(Probe {
                value: 1.0,
                asked: &asked,
            });
        assert!(asked.get());
    }

    /// Only a static recorder of no size whose histogram did not ask is the no-op: a sized one
    /// (a filter that drops the histogram) still gets its counter, and so does a zero-sized
    /// one boxed as `set_global_recorder` boxes it (one that only forwards counters).
    #[test]
    fn only_a_sizeless_static_recorder_that_never_asks_is_the_no_op() {
        static NOOP_STATIC: metrics::NoopRecorder = metrics::NoopRecorder;
        assert_eq!(kind_of(&NOOP_STATIC, false), NOOP);
        assert_eq!(kind_of(&NOOP_STATIC, true), REAL);
        assert_eq!(kind_of(&DebuggingRecorder::new(), false), REAL);
        assert_eq!(kind_of(&DebuggingRecorder::new(), true), REAL);
        let boxed: &'static dyn Recorder = Box::leak(Box::new(metrics::NoopRecorder));
        assert_eq!(kind_of(boxed, false), REAL);
    }

    /// With no global recorder installed, the recorder a fresh thread sees is the facade's
    /// no-op, and it is taken for the no-op: the fast path that records nothing is kept.
    #[test]
    fn the_facades_own_no_op_is_taken_for_the_no_op() {
        let default = std::thread::spawn(|| {
            metrics::with_recorder(|recorder| {
                let asked = Cell::new(false);
                let key = metrics::Key::from_static_name("probe_test");
                let meta = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);
                recorder.register_histogram(&key, &meta).record(Probe {
                    value: 1.0,
                    asked: &asked,
                });
                kind_of(recorder, asked.get())
            })
        })
        .join()
        .unwrap();
        assert_eq!(default, NOOP);
    }

    /// A thread's local recorder is never the default, whatever the default is.
    #[test]
    fn a_local_recorder_is_recorded_to_on_each_call() {
        let recorder = DebuggingRecorder::new();
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..3 {
                assert_eq!(target(), Target::Each);
                metrics::with_recorder(|r| classify(r, true));
            }
        });
        assert_ne!(
            DEFAULT.load(Ordering::Acquire),
            0,
            "the default was learned"
        );
    }
}
