//! The random source of the jitter, injectable so tests are exact.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A source of uniformly distributed `u64`s, shared by a layer's services.
///
/// The layer draws from it only when it retries (jitter) or generates an `external_task_id`,
/// never on the success path. Implement it to replay a recorded sequence; [`SplitMix`] is the
/// default.
pub trait RandomSource: Send + Sync + fmt::Debug + 'static {
    /// The next uniformly distributed value.
    fn next_u64(&self) -> u64;

    /// 128 uniformly distributed bits (a generated `external_task_id`), in one step where the
    /// source can: the default draws `next_u64` twice, the first value in the high half.
    fn next_u128(&self) -> u128 {
        let high = self.next_u64();
        u128::from(high) << 64 | u128::from(self.next_u64())
    }
}

/// SplitMix64 over one atomic counter: lock-free, seedable, and the same sequence for the same
/// seed (per draw order).
///
/// Each thread reserves 64 steps of the counter at a time (one atomic add) and takes
/// them in order, so threads drawing at once neither contend for the counter on every draw nor
/// get a step twice: values never repeat. A thread drawing alone gets SplitMix64's sequence for
/// the seed; a thread that draws from several sources in turn keeps a block of one at a time,
/// and skips the rest of a block it gave up (still deterministic for the same draw order).
///
/// # Clone
///
/// There is no `Clone`: a layer keeps its source behind an `Arc`, so its services and their
/// clones draw from one sequence.
pub struct SplitMix {
    state: Counter,
    /// This source among the process's, for the threads' blocks.
    id: u64,
}

/// The counter on cache lines of its own: threads add to it, and a neighbour on its line (the
/// allocator puts small allocations side by side) would be invalidated with it.
#[repr(align(128))]
struct Counter(AtomicU64);

/// Counter steps a thread reserves at once: 32 generated ids per atomic add.
const BLOCK: u32 = 64;

/// A thread's reserved steps of one source's counter.
#[derive(Clone, Copy)]
struct Block {
    /// The source's `id`; 0: none.
    source: u64,
    /// The counter after the last step taken.
    last: u64,
    /// Steps still reserved after `last`.
    left: u32,
}

thread_local! {
    static RESERVED: Cell<Block> = const {
        Cell::new(Block {
            source: 0,
            last: 0,
            left: 0,
        })
    };
}

/// The next source's `id` (0 is no source).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix {
    /// A source with a fixed seed, for tests and reproducible runs.
    pub fn seeded(seed: u64) -> Self {
        SplitMix {
            state: Counter(AtomicU64::new(seed)),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// A source seeded from the process's hash randomness and the system time.
    pub fn from_entropy() -> Self {
        let mut hasher = RandomState::new().build_hasher();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        hasher.write_u128(nanos);
        SplitMix::seeded(hasher.finish())
    }
}

/// SplitMix64's output function: a well-mixed value of one counter step.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix {
    /// The counter after each of this thread's next `N` steps, from its reserved block
    /// (reserving another when it runs out).
    #[inline]
    fn steps<const N: usize>(&self) -> [u64; N] {
        RESERVED.with(|reserved| {
            let mut block = reserved.get();
            let steps = std::array::from_fn(|_| {
                if block.source != self.id || block.left == 0 {
                    let reserve = GOLDEN_GAMMA.wrapping_mul(u64::from(BLOCK));
                    block = Block {
                        source: self.id,
                        last: self.state.0.fetch_add(reserve, Ordering::Relaxed),
                        left: BLOCK,
                    };
                }
                block.last = block.last.wrapping_add(GOLDEN_GAMMA);
                block.left -= 1;
                block.last
            });
            reserved.set(block);
            steps
        })
    }
}

impl RandomSource for SplitMix {
    fn next_u64(&self) -> u64 {
        let [step] = self.steps::<1>();
        mix(step)
    }

    /// Two counter steps taken together from the thread's block: the same two values, in the
    /// same order, as two [`next_u64`](Self::next_u64) calls with no draw in between.
    fn next_u128(&self) -> u128 {
        let [high, low] = self.steps::<2>();
        u128::from(mix(high)) << 64 | u128::from(mix(low))
    }
}

impl fmt::Debug for SplitMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SplitMix").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let a = SplitMix::seeded(7);
        let b = SplitMix::seeded(7);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs[0], xs[1]);
        // The reference SplitMix64 sequence for seed 0 starts with this value.
        assert_eq!(SplitMix::seeded(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    /// SplitMix64 by its definition: the `k`-th value (from 1) mixes `seed + k × gamma`.
    fn reference(seed: u64, k: u64) -> u64 {
        mix(seed.wrapping_add(GOLDEN_GAMMA.wrapping_mul(k)))
    }

    #[test]
    fn a_thread_drawing_alone_gets_the_reference_sequence_across_blocks() {
        let source = SplitMix::seeded(42);
        let mut k = 0;
        // Singles and pairs, so that a pair straddles a block's end.
        for round in 0..3 * u64::from(BLOCK) {
            if round % 3 == 0 {
                let id = source.next_u128();
                assert_eq!((id >> 64) as u64, reference(42, k + 1));
                assert_eq!(id as u64, reference(42, k + 2));
                k += 2;
            } else {
                assert_eq!(source.next_u64(), reference(42, k + 1));
                k += 1;
            }
        }
    }

    #[test]
    fn another_thread_draws_from_the_next_block() {
        let source = std::sync::Arc::new(SplitMix::seeded(9));
        assert_eq!(source.next_u64(), reference(9, 1));
        let other = std::sync::Arc::clone(&source);
        let drawn = std::thread::spawn(move || other.next_u64()).join().unwrap();
        assert_eq!(
            drawn,
            reference(9, u64::from(BLOCK) + 1),
            "not a step of this block"
        );
        assert_eq!(
            source.next_u64(),
            reference(9, 2),
            "this thread's block goes on"
        );
    }

    #[test]
    fn sources_drawn_in_turn_on_one_thread_stay_deterministic_and_unique() {
        let run = || {
            let (a, b) = (SplitMix::seeded(1), SplitMix::seeded(1));
            (0..200)
                .map(|i| {
                    if i % 3 == 0 {
                        b.next_u64()
                    } else {
                        a.next_u64()
                    }
                })
                .collect::<Vec<_>>()
        };
        let first = run();
        assert_eq!(first, run());
        // `a`'s own values never repeat (nor do `b`'s).
        let mut of_a: Vec<u64> = first
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(_, v)| *v)
            .collect();
        let drawn = of_a.len();
        of_a.sort_unstable();
        of_a.dedup();
        assert_eq!(of_a.len(), drawn);
    }

    #[test]
    fn the_counter_has_cache_lines_of_its_own() {
        assert!(std::mem::align_of::<SplitMix>() >= 128);
    }

    /// A source that only has `next_u64`: it gets the provided `next_u128`.
    #[derive(Debug)]
    struct Counting(std::sync::atomic::AtomicU64);

    impl RandomSource for Counting {
        fn next_u64(&self) -> u64 {
            self.0.fetch_add(1, Ordering::Relaxed)
        }
    }

    #[test]
    fn the_provided_next_u128_is_two_draws_high_half_first() {
        let source = Counting(AtomicU64::new(5));
        assert_eq!(source.next_u128(), 5u128 << 64 | 6);
        assert_eq!(source.next_u64(), 7);
    }

    #[test]
    fn splitmix_draws_128_bits_as_two_successive_u64s() {
        for seed in [0, 1, 7, u64::MAX, 0x9E37_79B9_7F4A_7C15] {
            let source = SplitMix::seeded(seed);
            for k in (1..8).step_by(2) {
                assert_eq!(
                    source.next_u128(),
                    u128::from(reference(seed, k)) << 64 | u128::from(reference(seed, k + 1)),
                    "seed {seed}"
                );
            }
            // Both advance the one sequence.
            assert_eq!(source.next_u64(), reference(seed, 9));
        }
    }

    #[test]
    fn ids_drawn_by_racing_threads_are_unique_and_well_mixed() {
        const THREADS: usize = 4;
        const DRAWS: usize = 20_000;
        let source = std::sync::Arc::new(SplitMix::seeded(11));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let source = std::sync::Arc::clone(&source);
                std::thread::spawn(move || {
                    (0..DRAWS)
                        .map(|i| {
                            // Interleave both kinds of draw, as jitter and ids do.
                            if i % 5 == 0 {
                                source.next_u64();
                            }
                            source.next_u128()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let ids: Vec<u128> = handles
            .into_iter()
            .flat_map(|handle| handle.join().unwrap())
            .collect();
        // Unique, and so are their halves: no counter step was handed out twice.
        let mut halves: Vec<u64> = ids
            .iter()
            .flat_map(|id| [(*id >> 64) as u64, *id as u64])
            .collect();
        halves.sort_unstable();
        halves.dedup();
        assert_eq!(halves.len(), 2 * THREADS * DRAWS);
        // Well mixed: every one of the 128 bits is set in about half of the ids (80,000 draws:
        // a standard deviation of about 141, so 2,000 away is far beyond chance).
        let total = ids.len();
        for bit in 0..128 {
            let ones = ids.iter().filter(|id| *id >> bit & 1 == 1).count();
            assert!(
                ones.abs_diff(total / 2) < 2_000,
                "bit {bit} set in {ones} of {total}"
            );
        }
    }
}
