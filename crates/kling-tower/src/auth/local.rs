//! Each thread's own copy of the `Authorization` values in use.
//!
//! Every request clones the header value, and a `HeaderValue` clone bumps the reference count of
//! its bytes: with one shared copy, every thread writes that one cache line twice per request
//! (and a JWT took a mutex besides). A copy per thread keeps those writes in the thread's own
//! cache; a JWT request reads the shared token generation (a load, no write) to know its copy is
//! still the current token.
//!
//! A copy does not outlive its layer for long: the thread that drops a JWT layer drops its own
//! copy of that layer's token at once, and every other thread drops its copies of layers that
//! are gone at its next JWT request, through any layer (a layer dropped moves a counter that
//! each such request compares with what its thread last saw: one load and one comparison).
//! A copy is found only by the layer that made it (each layer's cache has an id of its own,
//! never reused), so no other layer, of this account or another, sends it. Like any header it
//! is marked sensitive, so `Debug` never shows it.
//!
//! What a thread that sends no JWT request again keeps after the layer is gone, until it ends:
//! the signed token (`Bearer <jwt>`, valid until its `exp`, at most [`TOKEN_LIFETIME`] after
//! it was signed, then worth nothing) and a weak way back to the layer's cache, which keeps
//! only that cache's allocation, not its contents. Never the secret key, the access key or the
//! signing key: those go with the layer's last clone, whatever the threads keep. (Memory freed
//! is not wiped, here as anywhere in the crate.) The copy is not freed by the thread that drops
//! the layer because no other thread can reach it: letting one would need a lock or a shared
//! reference count on every request, which is what the copy exists to avoid.
//!
//! [`TOKEN_LIFETIME`]: super::TOKEN_LIFETIME

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use tokio::time::Instant;

use super::Shared;

/// The way back to a layer's token cache from a response future (to drop a refused token),
/// one per thread and token: cloning it writes this thread's reference count, not the shared
/// cache's. Weak, so a thread's copy does not keep the credentials alive.
pub(crate) type Owner = Arc<Weak<Shared>>;

/// How many layers' values a thread keeps (more layers share slots and copy again).
pub(super) const SLOTS: usize = 4;

/// Identifies one layer's token cache (its [`super::Shared`]) in the thread slots.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How many JWT layers' caches have been dropped: a thread that finds it moved since it last
/// looked drops its copies of layers that are gone.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// A fresh layer id, never 0 (0 marks an empty slot).
pub(super) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// One layer's value as this thread last copied it.
struct Copy {
    id: u64,
    generation: u64,
    /// When to renew, in the layer's wall-clock time and in tokio's (see [`Now`]).
    renew_at: Duration,
    renew_by: Instant,
    header: HeaderValue,
    owner: Owner,
}

/// The time a copy is checked at: the wall clock's, or, for a clock whose time passes as
/// tokio's does ([`WallClock::passes_with_tokio`](crate::clock::WallClock::passes_with_tokio)),
/// tokio's, which the call has read already.
#[derive(Clone, Copy, Debug)]
pub(super) enum Now {
    Unix(Duration),
    Tokio(Instant),
}

/// A thread's copies, and [`DROPPED`] as it was when the thread last dropped the copies of
/// layers that are gone.
struct Copies {
    seen: u64,
    slots: [Option<Copy>; SLOTS],
}

thread_local! {
    static COPIES: RefCell<Copies> = const {
        RefCell::new(Copies { seen: 0, slots: [const { None }; SLOTS] })
    };
}

fn slot(id: u64) -> usize {
    (id % SLOTS as u64) as usize
}

/// This thread's copy of layer `id`'s value when it is of token `generation` and `now` is
/// before its renewal time, with its [`Owner`] when `owner` asks for it. After a layer's cache
/// was dropped anywhere, this thread first drops its copies of layers that are gone.
#[inline]
pub(super) fn get(
    id: u64,
    generation: u64,
    now: Now,
    owner: bool,
) -> Option<(HeaderValue, Option<Owner>)> {
    COPIES.with(|cell| {
        let copies = cell.borrow();
        if copies.seen != DROPPED.load(Ordering::Relaxed) {
            drop(copies);
            drop_gone(&mut cell.borrow_mut());
            return find(&cell.borrow(), id, generation, now, owner);
        }
        find(&copies, id, generation, now, owner)
    })
}

#[inline(always)]
fn find(
    copies: &Copies,
    id: u64,
    generation: u64,
    now: Now,
    owner: bool,
) -> Option<(HeaderValue, Option<Owner>)> {
    match &copies.slots[slot(id)] {
        Some(copy) if copy.id == id && copy.generation == generation && copy.fresh(now) => {
            Some((copy.header.clone(), owner.then(|| copy.owner.clone())))
        }
        _ => None,
    }
}

/// Drops this thread's copies of layers that are gone, if any layer was dropped since it last
/// looked.
#[cold]
fn drop_gone(copies: &mut Copies) {
    // Read before looking: a layer dropped meanwhile moves it again, for the next request.
    let dropped = DROPPED.load(Ordering::Acquire);
    if copies.seen == dropped {
        return;
    }
    for copy in &mut copies.slots {
        if copy.as_ref().is_some_and(|c| c.owner.strong_count() == 0) {
            *copy = None;
        }
    }
    copies.seen = dropped;
}

impl Copy {
    fn fresh(&self, now: Now) -> bool {
        match now {
            Now::Unix(now) => now < self.renew_at,
            Now::Tokio(now) => now < self.renew_by,
        }
    }
}

/// Keeps a copy of `header` (token `generation`, to be renewed at `renew_at`, which is
/// `renew_by` in tokio's time) for this thread,
/// in bytes of its own, with `owner`.
pub(super) fn put(
    id: u64,
    generation: u64,
    renew_at: Duration,
    renew_by: Instant,
    header: &HeaderValue,
    owner: Owner,
) {
    let mut own = match HeaderValue::from_maybe_shared(Bytes::copy_from_slice(header.as_bytes())) {
        Ok(own) => own,
        // A valid value copies to a valid value; keep nothing rather than panic.
        Err(_) => return,
    };
    own.set_sensitive(true);
    COPIES.with(|copies| {
        let mut copies = copies.borrow_mut();
        drop_gone(&mut copies);
        copies.slots[slot(id)] = Some(Copy {
            id,
            generation,
            renew_at,
            renew_by,
            header: own,
            owner,
        });
    });
}

/// Layer `id`'s cache is being dropped: this thread drops its copy now, and every other
/// thread drops its copies of layers that are gone at its next JWT request ([`get`]).
pub(super) fn dropped(id: u64) {
    // Released after the layer's last strong reference went: a thread that reads the new
    // count finds the layer gone.
    DROPPED.fetch_add(1, Ordering::Release);
    // Not while the thread is ending, or (never, as no copy owns a layer) inside a borrow.
    let _ = COPIES.try_with(|copies| {
        if let Ok(mut copies) = copies.try_borrow_mut()
            && let Some(copy) = &mut copies.slots[slot(id)]
            && copy.id == id
        {
            copies.slots[slot(id)] = None;
        }
    });
}

/// Whether this thread keeps a copy of layer `id`'s value.
#[cfg(test)]
pub(super) fn holds(id: u64) -> bool {
    COPIES.with(|copies| {
        copies
            .borrow()
            .slots
            .iter()
            .any(|copy| copy.as_ref().is_some_and(|copy| copy.id == id))
    })
}

/// This thread's copy of layer `id`'s value and its way back, whatever its generation and time.
#[cfg(test)]
pub(super) fn kept(id: u64) -> Option<(HeaderValue, Owner)> {
    COPIES.with(|copies| {
        copies
            .borrow()
            .slots
            .iter()
            .flatten()
            .find(|copy| copy.id == id)
            .map(|copy| (copy.header.clone(), copy.owner.clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A way back to a live layer's cache (a copy of a layer that is gone may be dropped at
    /// any request, when another test drops a layer), and that layer.
    fn owner() -> (super::super::AuthLayer, Owner) {
        let credentials = super::super::Credentials::access_key("ak", "sk").unwrap();
        let layer = super::super::AuthLayer::new(credentials);
        let owner = Arc::new(Arc::downgrade(&layer.shared));
        (layer, owner)
    }

    fn unix(secs: u64) -> Now {
        Now::Unix(Duration::from_secs(secs))
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_is_found_only_for_its_layer_generation_and_time() {
        let start = Instant::now();
        let id = next_id();
        let value = HeaderValue::from_static("Bearer t1");
        assert!(get(id, 1, unix(0), false).is_none());
        let (_layer, kept) = owner();
        let renew_by = start + Duration::from_secs(100);
        put(
            id,
            1,
            Duration::from_secs(100),
            renew_by,
            &value,
            kept.clone(),
        );
        let (copy, none) = get(id, 1, unix(99), false).expect("the copy");
        assert!(none.is_none());
        let (_, found) = get(id, 1, unix(99), true).unwrap();
        assert!(Arc::ptr_eq(&found.unwrap(), &kept));
        assert_eq!(copy, value);
        assert!(copy.is_sensitive());
        // Its own bytes, not the shared ones.
        assert_ne!(copy.as_bytes().as_ptr(), value.as_bytes().as_ptr());
        assert!(get(id, 2, unix(99), false).is_none(), "another token");
        assert!(get(id, 1, unix(100), false).is_none(), "due for renewal");
        // The same in tokio's time.
        let at = |secs| Now::Tokio(start + Duration::from_secs(secs));
        assert!(get(id, 1, at(99), false).is_some());
        assert!(get(id, 1, at(100), false).is_none(), "due for renewal");
        // Another layer in the same slot takes it over.
        let other = id + SLOTS as u64;
        let value = HeaderValue::from_static("Bearer other");
        let (_other_layer, other_owner) = owner();
        put(other, 1, Duration::MAX, start, &value, other_owner);
        assert!(get(id, 1, unix(0), false).is_none());
        assert_eq!(get(other, 1, unix(0), false).unwrap().0, "Bearer other");
        // Other threads keep their own.
        let found = std::thread::spawn(move || get(other, 1, unix(0), false).is_some())
            .join()
            .unwrap();
        assert!(!found);
    }
}
