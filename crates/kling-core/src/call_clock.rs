//! One clock reading per call, shared by the layers whose `call` runs inside another's.
//!
//! A stack's `call`s run synchronously one inside the other: the metrics layer's `call` calls
//! the retry layer's, which calls the slots layer's, and so on down to the client. For a rate
//! limit, a deadline or a metric they all happen at the same instant, yet each layer read the
//! clock on its own, and on a virtual machine a read costs about 20 ns (`perf` put
//! `__vdso_clock_gettime` at 6% of a Pro stack request with four reads, BENCHMARKS.md).
//!
//! [`scoped`] reads the clock once and lets every layer `call`ed inside it use that reading
//! through [`scoped`] or [`now`]. Nothing that runs later sees it: a response future's `poll`,
//! a buffer's worker or a waiter woken later reads the clock afresh, because the reading is
//! only visible on this thread while the outermost `scoped` runs.
//!
//! The metrics and retry layers share it, and so does kling-tower's auth layer when it checks
//! a cached JWT: nothing between them waits on the usual path, and what they time (a call's
//! start, its deadline, a retry budget's window, a token's renewal) is not changed by the few
//! hundred nanoseconds a reading ages on its way down the stack (a request that waited in a
//! limiter is called from a poll, outside the scope). The limiters do not: a GCRA decision
//! at an instant that old lets another thread's later decision come first, and under a tight
//! quota that turned admissions into timer waits (measured with `kling-bench profile "Pro
//! stack" 300000 64`, whose 1 ns emission interval is the tightest there is).

use std::cell::Cell;
use std::marker::PhantomData;

use tokio::time::Instant;

thread_local! {
    /// The reading of the `call` running on this thread, while one runs.
    static READING: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with the instant of the call being made: the reading of an enclosing
/// [`scoped`] (when this runs inside another layer's `call`), else a fresh reading that the
/// layers `f` calls then share.
///
/// # Example
///
/// ```
/// use kling_core::call_clock;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (outer, inner) = call_clock::scoped(|outer| (outer, call_clock::now()));
/// assert_eq!(outer, inner);
/// # }
/// ```
#[inline]
pub fn scoped<R>(f: impl FnOnce(Instant) -> R) -> R {
    let (now, _scope) = enter();
    f(now)
}

/// What [`scoped`] does, without a closure: the instant of the call being made, shared with
/// the layers called while the returned [`Scope`] lives. For a layer's `call`, whose request a
/// closure would copy in and out again.
///
/// ```
/// use kling_core::call_clock;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (outer, scope) = call_clock::enter();
/// assert_eq!(call_clock::now(), outer);
/// drop(scope);
/// # }
/// ```
#[inline]
pub fn enter() -> (Instant, Scope) {
    match READING.try_with(Cell::get) {
        Ok(Some(now)) => (now, Scope::inner()),
        Ok(None) => {
            let now = Instant::now();
            READING.set(Some(now));
            (
                now,
                Scope {
                    clears: true,
                    _this_thread: PhantomData,
                },
            )
        }
        // The thread is tearing down its locals: no sharing.
        Err(_) => (Instant::now(), Scope::inner()),
    }
}

/// Keeps the reading [`enter`] returned for the calls made while it lives, on this thread (it
/// cannot be sent to another). The outermost one clears it when dropped; drop it before the
/// `call` returns (forgetting it would leave the reading to this thread's later calls).
#[must_use = "the reading is shared only while the scope lives"]
#[derive(Debug)]
pub struct Scope {
    /// Whether this scope set the reading (the outermost), and so clears it.
    clears: bool,
    _this_thread: PhantomData<*const ()>,
}

impl Scope {
    fn inner() -> Scope {
        Scope {
            clears: false,
            _this_thread: PhantomData,
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if self.clears {
            let _ = READING.try_with(|reading| reading.set(None));
        }
    }
}

/// The reading of the enclosing [`scoped`], or a fresh one when there is none.
#[inline]
pub fn now() -> Instant {
    match READING.try_with(Cell::get) {
        Ok(Some(now)) => now,
        _ => Instant::now(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn calls_inside_share_the_outer_reading_and_nothing_after_sees_it() {
        let outer = scoped(|outer| {
            // A nested scope and a plain read both give the outer reading.
            assert_eq!(scoped(|inner| inner), outer);
            assert_eq!(now(), outer);
            outer
        });
        tokio::time::advance(Duration::from_secs(1)).await;
        // Outside, the clock is read afresh.
        assert_eq!(now(), outer + Duration::from_secs(1));
        assert_eq!(scoped(|again| again), outer + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_entered_scope_shares_its_reading_until_it_is_dropped() {
        let (outer, scope) = enter();
        let (inner, nested) = enter();
        assert_eq!(inner, outer);
        // A nested scope's end leaves the outer reading in place, however time moves.
        drop(nested);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(now(), outer);
        drop(scope);
        assert_eq!(now(), outer + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_inside_clears_the_reading() {
        let caught = std::panic::catch_unwind(|| scoped(|_| panic!("a layer panicked")));
        assert!(caught.is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        let fresh = Instant::now();
        assert_eq!(now(), fresh);
    }

    #[test]
    fn each_thread_has_its_own_reading() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            scoped(|outer| {
                let other = std::thread::spawn(|| READING.with(Cell::get))
                    .join()
                    .unwrap();
                assert_eq!(other, None);
                assert_eq!(now(), outer);
            });
        });
    }
}
