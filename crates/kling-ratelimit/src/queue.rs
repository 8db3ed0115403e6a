//! The per-key FIFO queues of waiting requests (one process's part of the waiting).
//!
//! Each key's queue is a [`WaitList`]: a waiter's record is its ticket number and its waker
//! (24 bytes in the list's ring buffer), a waiter finds itself by binary search, and one that
//! gives up behind the head leaves a tombstone, so giving up is O(log n), does not shift the
//! queue, and a head that waits long keeps no more tombstones than there are waiters. A class
//! key's queue has a second list in front of it, for requests that passed the class gate and
//! came back from a paused account ([`Queues::enqueue_returned`]), and a third beside it, for
//! requests that passed the class gate and reached the head of their account's queue too soon
//! after their class's last send ([`Queues::hold`]): they wait there, out of the account's way,
//! and go back to the front of the account's queue one at a time ([`Queues::release_held`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use kling_core::metrics::{LABEL_ACCOUNT, RATELIMIT_QUEUE_DEPTH};
use kling_core::waitlist::{Removed, WaitList, Waiter};
use tokio::time::Instant;

use kling_core::RequestKind;

use crate::backend::BucketKey;
use crate::policy::later;
use crate::quota::Quota;

/// The size of one waiter's record in the queue.
pub(crate) const WAITER_RECORD_BYTES: usize = std::mem::size_of::<Waiter<()>>();

#[derive(Debug)]
struct Queue {
    waiters: WaitList<()>,
    /// For a class key's queue: requests back from the account gate
    /// ([`Queues::enqueue_returned`]), ahead of every waiter in `waiters` (which all came
    /// after they passed this gate), in the order they came back. Tickets come from the same
    /// `next_id` as the others'.
    returned: WaitList<()>,
    /// For a class key's queue: requests that passed the gate and reached the head of their
    /// account's queue before their class's record of sends allowed them
    /// ([`Queues::hold`]), in that order. Its head leads it alone, beside the gate's queue,
    /// while none of them is out at the account's queue (`held_out`).
    held: WaitList<()>,
    /// For a class key's queue: the held request that was out at its account's queue
    /// (`held_out`) and was held there again (its class quota changed while it waited there:
    /// [`Queues::hold`] with `again`). It leads the held requests, which all came after it,
    /// so they keep their order. At most one: only the one out is held again.
    held_again: WaitList<()>,
    /// For a class key's queue: the ticket, in its account's queue, of the held request that
    /// went back there and is not sent yet ([`Queues::release_held`]); the next one waits for
    /// it, so they are sent in order.
    held_out: Option<u64>,
    /// For an account key's queue: the tickets of its returned requests (held class requests
    /// released to the front of the queue) and their class, so that one leaving clears its
    /// class's `held_out`.
    from_held: Vec<(u64, RequestKind)>,
    /// The tickets of waiters whose first ask of the backend is on its way (a remote store's
    /// round trip: [`Queues::ask_in_flight`]). They hold their place, so that one refused keeps
    /// it, but they wait for nothing yet: a request that comes meanwhile asks too rather than
    /// wait for their answers, and they are not counted as waiting (nor in the depth gauge)
    /// until refused. A request that must wait leaves room for them ([`Queue::is_full`],
    /// [`Queues::settle`]): they came before it.
    in_flight: Vec<u64>,
    next_id: u64,
    /// The head's latest "not before", a lower bound on every other waiter's turn, and
    /// whether it is the end of a pause (a cooldown) rather than pacing.
    head_not_before: Option<NotBefore>,
    /// The earliest wait limit of the waiters behind the head that noted one
    /// ([`Queues::poll_behind`]) since the head last woke them: a head that meets a pause
    /// ending past it wakes them, so those that cannot go in time fail then, not at their
    /// limit. Not noted by one the hint fails at once, not lowered when one leaves (at worst
    /// one wake too many), cleared by the wake.
    earliest_limit: Option<Instant>,
    /// For a class key's queue: the end of the account's pause, met by one of its requests
    /// after passing the class gate. Unlike the head's hint it outlives the head: each head
    /// waits for it before asking the class gate, so the class quota spaces the sending after
    /// the pause too.
    account_paused_until: Option<Instant>,
    /// Moved by one per waiter, never set: the gauge is labelled by account only, and an
    /// account's class keys (and the keys of other layers in the process) add up in it.
    depth: metrics::Gauge,
}

impl Queue {
    fn new(key: &BucketKey) -> Queue {
        let account = key
            .account_id()
            .map_or("", |a| kling_core::metrics::account_label(a.as_str()));
        Queue {
            waiters: WaitList::new(),
            returned: WaitList::new(),
            held: WaitList::new(),
            held_again: WaitList::new(),
            held_out: None,
            from_held: Vec::new(),
            in_flight: Vec::new(),
            next_id: 0,
            head_not_before: None,
            earliest_limit: None,
            account_paused_until: None,
            depth: metrics::gauge!(RATELIMIT_QUEUE_DEPTH, LABEL_ACCOUNT => account),
        }
    }

    /// Wakes the head, if anyone waits.
    fn wake_head(&self) {
        let head = self.returned.front().or_else(|| self.waiters.front());
        if let Some(waker) = head.and_then(|w| w.waker.as_ref()) {
            waker.wake_by_ref();
        }
    }

    /// Sets the head's hint (`head` leads). A pause the waiters behind have not been shown
    /// (pacing before, or a shorter pause) wakes them when one of them cannot wait it out: it
    /// fails now rather than at its limit.
    fn show_behind(&mut self, head: u64, at: Instant, cooldown: bool) {
        let new_pause =
            cooldown && !matches!(self.head_not_before, Some((before, true)) if before >= at);
        self.head_not_before = Some((at, cooldown));
        if new_pause && self.earliest_limit.is_some_and(|limit| limit < at) {
            self.earliest_limit = None;
            self.wake_behind(head);
        }
    }

    /// Wakes every waiter but `head`, held ones included: each looks at the head's hint again.
    fn wake_behind(&self, head: u64) {
        let lists = [&self.returned, &self.waiters, &self.held_again, &self.held];
        for waiter in lists.into_iter().flat_map(WaitList::iter) {
            if waiter.ticket != head
                && let Some(waker) = &waiter.waker
            {
                waker.wake_by_ref();
            }
        }
    }

    /// Wakes the head of the held requests, if one may lead them.
    fn wake_held(&self) {
        let head = self.held_again.front().or_else(|| self.held.front());
        let head = head.filter(|_| self.held_out.is_none());
        if let Some(waker) = head.and_then(|w| w.waker.as_ref()) {
            waker.wake_by_ref();
        }
    }

    /// Live places, returned and held ones included, and those whose first ask is on its way.
    fn places(&self) -> usize {
        self.waiters.waiting() + self.returned.waiting() + self.held_waiting()
    }

    /// Live waiters that wait for their turn: [`Queue::places`] without those whose first ask
    /// is on its way (`in_flight`). What `max_queue` bounds, the depth gauge shows and
    /// [`Queues::depth`] counts.
    fn settled(&self) -> usize {
        self.places().saturating_sub(self.in_flight.len())
    }

    /// Whether a request joining now is refused under `max`. One that asks at once (nobody
    /// ahead of it but first asks on their way) counts the waiters only; one that must queue,
    /// or was refused already (`refused`), also counts those asks, which came before it and
    /// need a place if refused: arrival order, not the order answers come back in, decides
    /// who waits.
    fn is_full(&self, max: usize, refused: bool) -> bool {
        let asks_at_once =
            !refused && self.waiters.waiting() == self.in_flight.len() && self.returned.is_empty();
        let ahead = if asks_at_once {
            self.settled()
        } else {
            self.places()
        };
        ahead >= max
    }

    /// Live held waiters (held again included).
    fn held_waiting(&self) -> usize {
        self.held.waiting() + self.held_again.waiting()
    }

    /// Live waiters that ask the key's backend (held ones only wait beside it).
    fn asking(&self) -> usize {
        self.waiters.waiting() + self.returned.waiting()
    }

    /// Whether the queue keeps nothing: no waiter (nor tombstone), and no held request out.
    fn is_empty(&self) -> bool {
        self.waiters.is_empty()
            && self.returned.is_empty()
            && self.held.is_empty()
            && self.held_again.is_empty()
            && self.held_out.is_none()
    }

    /// Whether waiter `id` leads, if it waits here: the first returned one, else the first
    /// of the others; a held one leads the held ones while none of them is out.
    fn is_head(&self, id: u64) -> Option<bool> {
        if let Some(index) = self.held_again.position(id) {
            return Some(index == 0 && self.held_out.is_none());
        }
        if let Some(index) = self.held.position(id) {
            return Some(index == 0 && self.held_again.is_empty() && self.held_out.is_none());
        }
        match self.returned.position(id) {
            Some(index) => Some(index == 0),
            None => Some(self.waiters.position(id)? == 0 && self.returned.is_empty()),
        }
    }
}

/// The head's latest answer from the backend: not before this instant, and whether the key is
/// paused (a cooldown) until then.
pub(crate) type NotBefore = (Instant, bool);

/// Where a class request at the head of its account's queue stands among its class's held
/// requests ([`Queues::class_turn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClassTurn {
    /// None is held or out: the class's record of sends decides.
    Free,
    /// It is the held request out at the account's queue: the record decides.
    Out,
    /// Others are held or out before it: it is held behind them.
    Behind,
}

/// A class key's record of sends ([`Queues::note_class_sent`]): the GCRA theoretical arrival
/// time of its next send, reckoned in emission intervals of `period`.
#[derive(Debug, Clone, Copy)]
struct ClassSends {
    tat: Instant,
    period: std::time::Duration,
}

impl ClassSends {
    /// The theoretical arrival time under `quota` at `now`: after a class quota change, the
    /// wait left counts the same number of emission intervals under the new quota, as the
    /// class gate's own debt does (the in-process backend's `apply`).
    fn under(&mut self, quota: Quota, now: Instant) -> Instant {
        let period = quota.period();
        if period != self.period {
            if self.tat > now {
                let ratio = period.as_secs_f64() / self.period.as_secs_f64();
                let left = self.tat.duration_since(now).as_secs_f64() * ratio;
                // (Past the clock's range: saturated by `later`.)
                let left = std::time::Duration::try_from_secs_f64(left)
                    .unwrap_or(std::time::Duration::MAX);
                self.tat = later(now, left);
            }
            self.period = period;
        }
        self.tat
    }
}

/// Every class key's record of sends ([`Queues::note_class_sent`]).
#[derive(Debug, Default)]
struct ClassSendsTable {
    records: HashMap<BucketKey, ClassSends>,
    /// The latest theoretical arrival time a record was given: once it is past, every record
    /// is, and the table is emptied at once (a record past its time decides as none).
    latest: Option<Instant>,
}

impl ClassSendsTable {
    /// Notes that a record now runs until `tat`.
    fn runs_until(&mut self, tat: Instant) {
        self.latest = self.latest.max(Some(tat));
    }

    /// `key`'s record under `quota` at `now`, if it runs past `now`. One past its time is
    /// dropped, and every record when the latest is past: the table keeps about the records
    /// still running, at a cost per look independent of how many keys it holds.
    fn running(&mut self, key: &BucketKey, quota: Quota, now: Instant) -> Option<Instant> {
        let tat = self
            .records
            .get_mut(key)
            .map(|record| record.under(quota, now));
        match tat {
            Some(tat) if tat > now => {
                // (A slower quota moves it on.)
                self.runs_until(tat);
                Some(tat)
            }
            Some(_) => {
                self.records.remove(key);
                self.forget_past(now);
                None
            }
            None => {
                self.forget_past(now);
                None
            }
        }
    }

    /// Empties the table when its latest record is past.
    fn forget_past(&mut self, now: Instant) {
        if self.latest.is_none_or(|latest| latest <= now) {
            self.records.clear();
            self.latest = None;
        }
    }
}

/// How a request joins a queue ([`Queues::enqueue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Joins {
    /// To ask the gate: at once when it leads, or when only first asks on their way are
    /// ahead of it.
    ToAsk,
    /// Its first ask is on its way already ([`Queues::ask_in_flight`]).
    Asking,
    /// Refused already: it waits for its turn whatever is ahead of it.
    Refused,
}

/// Where a new waiter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) id: u64,
    /// It leads, and asks now: from [`Queues::enqueue`], also when only asks on their way
    /// are ahead of it (it asks too, and [`Queues::set_head_not_before`] tells it apart).
    pub(crate) is_head: bool,
}

/// Every key's queue of one limiter.
#[derive(Debug, Default)]
pub(crate) struct Queues {
    map: Mutex<HashMap<BucketKey, Queue>>,
    /// Waiters over all keys: zero lets a request skip the queues entirely.
    waiting: AtomicUsize,
    /// Of those, the ones whose first ask is on their way (every queue's `in_flight`), moved
    /// under `map`'s lock as they are: [`Queues::waiting`] leaves them out without a walk
    /// over every key.
    asking: AtomicUsize,
    /// For each class key one of whose requests was sent through the gate lately: the GCRA
    /// theoretical arrival time of its next send, under the class quota
    /// ([`Queues::class_send_at`]), and the emission interval it was reckoned in. Kept while
    /// in the future (dropped lazily).
    class_sends: Mutex<ClassSendsTable>,
    /// Whether `class_sends` may hold a record: a class request admitted in `call` asks
    /// [`Queues::class_sends_running`] only then, so a layer whose class requests never wait
    /// takes no lock for it.
    class_sends_kept: AtomicBool,
    /// Numbers class requests in the order they pass their class gate
    /// ([`Queues::next_pass`]): the order they come back from a paused account in.
    passes: AtomicU32,
}

impl Queues {
    fn lock(&self) -> MutexGuard<'_, HashMap<BucketKey, Queue>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether no request waits anywhere.
    #[inline]
    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.load(Ordering::Acquire) == 0
    }

    /// Whether a class request's send may have to wait for its class's record
    /// ([`Queues::class_send_at`]): false while no class request was sent through the gate
    /// lately.
    #[inline]
    pub(crate) fn keeps_class_sends(&self) -> bool {
        self.class_sends_kept.load(Ordering::Acquire)
    }

    /// When a request of class key `key` may be sent, if not at `now`: the class quota
    /// applied to the instants this process sent the class's requests through the gate
    /// ([`Queues::note_class_sent`]), so that requests that passed the class gate a turn apart
    /// and then waited unequally at the account gate (a pause there, or a queue that shrank)
    /// are still sent a turn apart. Records already past are dropped.
    pub(crate) fn class_send_at(
        &self,
        key: &BucketKey,
        quota: Quota,
        now: Instant,
    ) -> Option<Instant> {
        let tat = self.running_class_sends(key, quota, now)?;
        // GCRA: the next send may come `burst - 1` periods before the theoretical time.
        let tolerance = quota
            .period()
            .checked_mul(quota.burst().saturating_sub(1))
            .unwrap_or(std::time::Duration::MAX);
        tat.checked_sub(tolerance).filter(|at| *at > now)
    }

    /// Whether class key `key`'s record of sends runs past `now` (under `quota`): a class
    /// request admitted in `call` then goes through the gate, which holds it while the record
    /// binds and notes its send ([`Queues::note_class_sent`]); else it is sent from `call`.
    /// Only the key's own record is looked at: one account's late class send routes no other
    /// account's class requests through the gate.
    pub(crate) fn class_sends_running(&self, key: &BucketKey, quota: Quota, now: Instant) -> bool {
        self.running_class_sends(key, quota, now).is_some()
    }

    /// `key`'s record under `quota` at `now`, if it runs past `now` (records past their time
    /// are dropped: [`ClassSendsTable::running`]). With the last record gone, the requests
    /// admitted in `call` stop asking.
    fn running_class_sends(&self, key: &BucketKey, quota: Quota, now: Instant) -> Option<Instant> {
        let mut sends = self
            .class_sends
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let tat = sends.running(key, quota, now);
        if sends.records.is_empty() {
            self.class_sends_kept.store(false, Ordering::Release);
        }
        tat
    }

    /// A request of class key `key` was sent at `now` through the gate: the record
    /// [`Queues::class_send_at`] reads. Records past their time are dropped there, and here
    /// when the table reaches a power of two past 64, so it holds about the class keys sent
    /// lately.
    pub(crate) fn note_class_sent(&self, key: &BucketKey, quota: Quota, now: Instant) {
        let mut sends = self
            .class_sends
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let records = &mut sends.records;
        let record = match records.get_mut(key) {
            Some(record) => record,
            None => {
                if records.len() >= 64 && records.len().is_power_of_two() {
                    records.retain(|_, record| record.tat > now);
                }
                let record = ClassSends {
                    tat: now,
                    period: quota.period(),
                };
                records.entry(key.clone()).or_insert(record)
            }
        };
        record.tat = later(record.under(quota, now).max(now), quota.period());
        let tat = record.tat;
        sends.runs_until(tat);
        self.class_sends_kept.store(true, Ordering::Release);
    }

    /// Requests waiting over all keys: not those whose first ask is on its way
    /// ([`Queues::ask_in_flight`]), as [`Queues::depth`].
    pub(crate) fn waiting(&self) -> usize {
        let _map = self.lock();
        // (Both move under the lock: the difference is exact.)
        let asking = self.asking.load(Ordering::Relaxed);
        self.waiting.load(Ordering::Acquire).saturating_sub(asking)
    }

    /// Requests waiting for one key: as `max_queue` counts them and the depth gauge shows
    /// them, without those whose first ask is on its way (they may be admitted).
    pub(crate) fn depth(&self, key: &BucketKey) -> usize {
        self.lock().get(key).map_or(0, Queue::settled)
    }

    /// Requests waiting for one key that ask its backend: [`Queues::depth`] without a class
    /// key's held requests ([`Queues::hold`]), which never ask it.
    pub(crate) fn asking(&self, key: &BucketKey) -> usize {
        self.lock().get(key).map_or(0, Queue::asking)
    }

    /// Whether a request arriving at `now` at `key`'s gate would be refused a place in its
    /// queue, bounded at `max`: it holds `max` waiters or more (one at least: a request may
    /// be admitted at once when none waits), and its head waits out no pause (a class request
    /// arriving then goes back to its class gate rather than queue).
    pub(crate) fn turns_away(&self, key: &BucketKey, max: usize, now: Instant) -> bool {
        let map = self.lock();
        let Some(queue) = map.get(key) else {
            return false;
        };
        let paused = matches!(queue.head_not_before, Some((at, true)) if at > now);
        queue.is_full(max, false) && !paused
    }

    /// Joins the back of `key`'s queue; `Err(())` when it is full under `max`
    /// ([`Queue::is_full`]: a request that must queue leaves room for the first asks on their
    /// way ahead of it). The ticket says to ask at once when it leads, or when every waiter
    /// ahead of it has its ask on its way: it asks too rather than wait for their answers (and,
    /// refused, waits behind them, within the bound: [`Queues::settle`]). `how`: whether it
    /// is to ask, has its ask on its way already, or was refused already.
    pub(crate) fn enqueue(
        &self,
        key: &BucketKey,
        waker: &Waker,
        max: Option<usize>,
        how: Joins,
    ) -> Result<Ticket, ()> {
        let in_flight = how == Joins::Asking;
        let mut map = self.lock();
        if !map.contains_key(key) {
            map.insert(key.clone(), Queue::new(key));
        }
        let queue = map.get_mut(key).expect("inserted above");
        if max.is_some_and(|max| queue.is_full(max, how == Joins::Refused)) {
            if queue.is_empty() {
                map.remove(key);
            }
            return Err(());
        }
        // Before it joins: should the metrics recorder panic, nothing waits that no caller
        // holds a place for (it would be a head nobody polls, with everyone behind it). One
        // whose ask is on its way is not shown until refused ([`Queues::settle`]).
        if !in_flight {
            queue.depth.increment(1.0);
        }
        let id = queue.next_id;
        queue.next_id += 1;
        let asks_ahead = queue.waiters.waiting() == queue.in_flight.len();
        queue.waiters.push_back(id, (), waker.clone());
        if in_flight {
            queue.in_flight.push(id);
            self.asking.fetch_add(1, Ordering::Relaxed);
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Ok(Ticket {
            id,
            is_head: (queue.waiters.records() == 1 || asks_ahead) && queue.returned.is_empty(),
        })
    }

    /// Waiter `id` of `key`'s queue asks the backend for the first time, and the answer is on
    /// its way (a remote store's round trip): requests that come meanwhile ask too
    /// ([`enqueue`](Self::enqueue)), and it is not counted as waiting until refused
    /// ([`settle`](Self::settle)).
    #[cold]
    pub(crate) fn ask_in_flight(&self, key: &BucketKey, id: u64) {
        if let Some(queue) = self.lock().get_mut(key)
            && !queue.in_flight.contains(&id)
            && queue.waiters.position(id).is_some()
        {
            // Before it is marked, as in `enqueue`.
            queue.depth.decrement(1.0);
            queue.in_flight.push(id);
            self.asking.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waiter `id`, refused at its first ask (on its way, or answered at once), or joined to
    /// ask at once but waiting without asking (a class gate's head during its account's
    /// pause), waits for its turn from now: `Err(())` when `key`'s queue is full under `max`,
    /// counting the waiters
    /// and the first asks on their way that came before it, which need a place if refused
    /// (a later request's answer coming back first takes none of theirs). A returned or held
    /// request, which no bound refuses, is let be.
    #[cold]
    pub(crate) fn settle(&self, key: &BucketKey, id: u64, max: Option<usize>) -> Result<(), ()> {
        let mut map = self.lock();
        let Some(queue) = map.get_mut(key) else {
            return Ok(());
        };
        if queue.waiters.position(id).is_none() {
            return Ok(());
        }
        let marked = queue.in_flight.iter().position(|&ticket| ticket == id);
        if let Some(max) = max {
            // (Tickets go in arrival order.)
            let asking_ahead = queue.in_flight.iter().filter(|&&t| t < id).count();
            let others = queue.settled() - usize::from(marked.is_none());
            // One that joined as a waiter with no ask on its way ahead was bounded as it
            // joined ([`Queues::enqueue`]): nothing to make room for.
            if (marked.is_some() || asking_ahead > 0) && others + asking_ahead >= max {
                return Err(());
            }
        }
        if let Some(index) = marked {
            // Before it is unmarked, as in `enqueue`.
            queue.depth.increment(1.0);
            queue.in_flight.swap_remove(index);
            self.asking.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The number of a class request passing its class gate now: later passes get larger
    /// ones (modulo 2^32, which orders wrongly only across a wrap).
    pub(crate) fn next_pass(&self) -> u32 {
        self.passes.fetch_add(1, Ordering::Relaxed)
    }

    /// Joins class key `key`'s queue ahead of every request that has not passed its gate
    /// yet: a request that passed the gate and came back from the account gate (the response
    /// future's `Gate::back_to_class`), whose pass was number `pass` ([`Queues::next_pass`]).
    /// Among the ones that came back it stands in the order they passed the gate, not the
    /// order they came back in: the head of the account's queue meets a pause only when it
    /// asks again, after requests that passed the gate later met it on arriving. It keeps its
    /// turn before the class requests that came after it, and no `max_queue` applies: it was
    /// waiting already, and leaves the account's queue for this one.
    pub(crate) fn enqueue_returned(&self, key: &BucketKey, waker: &Waker, pass: u32) -> Ticket {
        let mut map = self.lock();
        if !map.contains_key(key) {
            map.insert(key.clone(), Queue::new(key));
        }
        let queue = map.get_mut(key).expect("inserted above");
        // Before it joins, as in `enqueue`.
        queue.depth.increment(1.0);
        let id = push_in_pass_order(&mut queue.returned, pass, waker);
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Ticket {
            id,
            is_head: queue.is_head(id) == Some(true),
        }
    }

    /// Joins the held requests of class key `key` (a request that passed its gate and reached
    /// the head of its account's queue before the class's record of sends allowed it, and
    /// left that queue). No `max_queue` applies: it was waiting already.
    ///
    /// `again`: it is the held request out at its account's queue, held there once more (its
    /// class quota changed while it waited there): it goes ahead of the held requests, which
    /// came after it. It joins before it leaves the account's queue, so that none of them
    /// takes its turn meanwhile: it leads once it left.
    pub(crate) fn hold(&self, key: &BucketKey, waker: &Waker, again: bool) -> Ticket {
        let mut map = self.lock();
        if !map.contains_key(key) {
            map.insert(key.clone(), Queue::new(key));
        }
        let queue = map.get_mut(key).expect("inserted above");
        // Before it joins, as in `enqueue`.
        queue.depth.increment(1.0);
        let id = queue.next_id;
        queue.next_id += 1;
        let list = if again {
            &mut queue.held_again
        } else {
            &mut queue.held
        };
        list.push_back(id, (), waker.clone());
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Ticket {
            id,
            is_head: queue.is_head(id) == Some(true),
        }
    }

    /// Where a class request of class key `key` at the head of its account's queue (holding
    /// `ticket` there, if it queues) stands among the class's held requests.
    pub(crate) fn class_turn(&self, key: &BucketKey, ticket: Option<u64>) -> ClassTurn {
        let map = self.lock();
        let Some(queue) = map.get(key) else {
            return ClassTurn::Free;
        };
        match queue.held_out {
            Some(out) if Some(out) == ticket => ClassTurn::Out,
            Some(_) => ClassTurn::Behind,
            None if queue.held_waiting() > 0 => ClassTurn::Behind,
            None => ClassTurn::Free,
        }
    }

    /// The head of class key `key`'s held requests, ticket `id`, goes back to the front of
    /// `account`'s queue (behind the ones that went back there before it, ahead of every other
    /// waiter): it waited its turn there already. Its class's next held request waits until
    /// it leaves that queue (sent or given up). Its new ticket.
    pub(crate) fn release_held(
        &self,
        key: &BucketKey,
        id: u64,
        account: &BucketKey,
        waker: &Waker,
    ) -> Ticket {
        let mut map = self.lock();
        let kind = key.request_kind().expect("a class key");
        // The account's queue is made, and the depths move, before the request leaves its
        // class's: should the metrics recorder panic, it is still held there, where its place
        // finds it, and it joins no queue that no caller holds a place in.
        if !map.contains_key(account) {
            map.insert(account.clone(), Queue::new(account));
        }
        map.get(account)
            .expect("inserted above")
            .depth
            .increment(1.0);
        let class = map.get_mut(key).expect("a held request's queue");
        class.depth.decrement(1.0);
        // Only the head of the held requests is released, while it waits there.
        let removed = match class.held_again.remove(id) {
            Removed::NotWaiting => class.held.remove(id),
            removed => removed,
        };
        debug_assert_eq!(removed, Removed::Head);
        let queue = map.get_mut(account).expect("inserted above");
        let ticket = queue.next_id;
        queue.next_id += 1;
        queue.returned.push_back(ticket, (), waker.clone());
        queue.from_held.push((ticket, kind));
        let is_head = queue.returned.records() == 1;
        map.get_mut(key).expect("held above").held_out = Some(ticket);
        Ticket {
            id: ticket,
            is_head,
        }
    }

    /// Whether ticket `id` is at the head; records `waker` either way.
    pub(crate) fn poll_head(
        &self,
        key: &BucketKey,
        id: u64,
        waker: &Waker,
    ) -> Result<bool, Option<NotBefore>> {
        self.poll_behind(key, id, waker, None)
    }

    /// [`poll_head`](Self::poll_head) for a waiter that must not wait past `limit`: behind
    /// the head, it notes the limit, so that the head wakes it when it meets a pause ending
    /// past it ([`set_head_not_before`](Self::set_head_not_before)).
    pub(crate) fn poll_behind(
        &self,
        key: &BucketKey,
        id: u64,
        waker: &Waker,
        limit: Option<Instant>,
    ) -> Result<bool, Option<NotBefore>> {
        let mut map = self.lock();
        let Some(queue) = map.get_mut(key) else {
            return Ok(false);
        };
        let (list, index) = match queue.returned.position(id) {
            Some(index) => (&mut queue.returned, index),
            None => match queue.waiters.position(id) {
                Some(index) => (&mut queue.waiters, index),
                None => match queue.held.position(id) {
                    Some(index) => (&mut queue.held, index),
                    None => match queue.held_again.position(id) {
                        Some(index) => (&mut queue.held_again, index),
                        None => return Ok(false),
                    },
                },
            },
        };
        list.set_waker(index, waker);
        if queue.is_head(id) == Some(true) {
            Ok(true)
        } else {
            // Not one the hint fails at once (a pause past its limit): left behind, it would
            // wake every waiter again when the pause is extended.
            let hint = queue.head_not_before;
            if let Some(limit) = limit
                && !matches!(hint, Some((at, true)) if at > limit)
            {
                queue.earliest_limit = Some(queue.earliest_limit.map_or(limit, |l| l.min(limit)));
            }
            Err(hint)
        }
    }

    /// The head's latest answer from the backend (and whether it is a pause), a lower bound
    /// for everyone behind it, from waiter `id`: false (and nothing set) when it no longer
    /// leads, a request having come back ahead of it
    /// ([`enqueue_returned`](Self::enqueue_returned)).
    pub(crate) fn set_head_not_before(
        &self,
        key: &BucketKey,
        id: u64,
        at: Instant,
        cooldown: bool,
    ) -> bool {
        let mut map = self.lock();
        let Some(queue) = map.get_mut(key) else {
            return true;
        };
        if queue.is_head(id) == Some(false) {
            return false;
        }
        queue.show_behind(id, at, cooldown);
        true
    }

    /// `key` is paused until `until`, as the report of an answer said (a 1302, a
    /// `Retry-After`): shown to the waiters behind its head now, as if the head had met it
    /// ([`set_head_not_before`](Self::set_head_not_before)). A head paced past the answer's
    /// arrival (a minute, under a per-minute quota) meets the pause only when it asks again,
    /// and those behind it that cannot wait the pause out would wait until their limit
    /// meanwhile. Not when the head's hint is as late already: a pacing instant past the
    /// pause's end is the stronger bound.
    #[cold]
    #[inline(never)]
    pub(crate) fn pause_reported(&self, key: &BucketKey, until: Instant) {
        let mut map = self.lock();
        let Some(queue) = map.get_mut(key) else {
            return;
        };
        if queue.head_not_before.is_some_and(|(at, _)| at >= until) {
            return;
        }
        let head = queue.returned.front().or_else(|| queue.waiters.front());
        if let Some(head) = head.map(|waiter| waiter.ticket) {
            queue.show_behind(head, until, true);
        }
    }

    /// The account of class key `key` is paused until `at` (one of its requests met the pause
    /// after passing the class gate): its heads ask the class gate no sooner.
    pub(crate) fn note_account_pause(&self, key: &BucketKey, at: Instant) {
        if let Some(queue) = self.lock().get_mut(key) {
            queue.account_paused_until = queue.account_paused_until.max(Some(at));
        }
    }

    /// The end of the account pause noted for class key `key`
    /// ([`note_account_pause`](Self::note_account_pause)), if any.
    pub(crate) fn account_paused_until(&self, key: &BucketKey) -> Option<Instant> {
        self.lock().get(key).and_then(|q| q.account_paused_until)
    }

    /// The end of the pause the head of `key`'s queue waits out, if it waits out one.
    pub(crate) fn head_paused_until(&self, key: &BucketKey) -> Option<Instant> {
        let map = self.lock();
        match map.get(key)?.head_not_before? {
            (at, true) => Some(at),
            (_, false) => None,
        }
    }

    /// Waiter `id` was admitted (or gave up): it leaves, and the next waiter is woken. True
    /// when it was the key's last live waiter that asks its backend (a held request, which
    /// never asks it, is never the last: [`Queues::asking`]).
    pub(crate) fn leave(&self, key: &BucketKey, id: u64) -> bool {
        let mut map = self.lock();
        let Some(queue) = map.get_mut(key) else {
            return false;
        };
        // One whose first ask was on its way was not shown in the depth gauge.
        let shown = match queue.in_flight.iter().position(|&ticket| ticket == id) {
            Some(index) => {
                queue.in_flight.swap_remove(index);
                self.asking.fetch_sub(1, Ordering::Relaxed);
                false
            }
            None => true,
        };
        let mut held = false;
        let led = match queue.returned.remove(id) {
            Removed::Head => true,
            Removed::Behind => false,
            Removed::NotWaiting => match queue.waiters.remove(id) {
                // The first of the others leads only when none came back ahead of it.
                Removed::Head => queue.returned.is_empty(),
                Removed::Behind => false,
                Removed::NotWaiting => {
                    let removed = match queue.held_again.remove(id) {
                        Removed::NotWaiting => queue.held.remove(id),
                        removed => removed,
                    };
                    match removed {
                        Removed::NotWaiting => return false,
                        Removed::Head => queue.wake_held(),
                        Removed::Behind => {}
                    }
                    held = true;
                    false
                }
            },
        };
        if led {
            queue.head_not_before = None;
            queue.wake_head();
        }
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        // A held class request that went back to its account's queue leaves it: the next
        // held one of its class may go.
        let out = match queue.from_held.iter().position(|(ticket, _)| *ticket == id) {
            Some(index) => Some(queue.from_held.swap_remove(index).1),
            None => None,
        };
        let last = !held && queue.asking() == 0;
        let gone = if queue.places() == 0 && queue.is_empty() {
            map.remove(key)
        } else {
            None
        };
        if let Some(kind) = out {
            let class_key = BucketKey::class(key.account_id().cloned(), kind);
            if let Some(class) = map.get_mut(&class_key)
                && class.held_out == Some(id)
            {
                class.held_out = None;
                class.wake_held();
                if class.is_empty() {
                    map.remove(&class_key);
                }
            }
        }
        // Last, once every change is made: should the metrics recorder panic, no class's held
        // requests wait for one that left, and no empty queue stays.
        let depth = match &gone {
            Some(queue) => Some(&queue.depth),
            None => map.get(key).map(|queue| &queue.depth),
        };
        if let Some(depth) = depth.filter(|_| shown) {
            leave_depth(depth);
        }
        last
    }

    /// Wakes the head of every queue, so it asks the backend again (after a quota change).
    pub(crate) fn wake_heads(&self) {
        for queue in self.lock().values() {
            queue.wake_head();
            queue.wake_held();
        }
    }

    /// Memory the queues reserve now, in bytes (ring buffers only).
    pub(crate) fn reserved_bytes(&self) -> usize {
        self.lock()
            .values()
            .map(|q| {
                (q.waiters.capacity()
                    + q.returned.capacity()
                    + q.held.capacity()
                    + q.held_again.capacity())
                    * WAITER_RECORD_BYTES
            })
            .sum()
    }
}

/// The bit set in the tickets of class requests back at their class gate from a paused
/// account ([`push_in_pass_order`]), above every ticket `next_id` hands out.
const PASSED: u64 = 1 << 63;

/// Adds a request whose pass through its class gate was number `pass`
/// ([`Queues::next_pass`]) to `list` (a class queue's requests back from a paused account) in
/// pass order; its ticket. The ticket is the pass number above `next_id`'s
/// range, so the list, ordered by ticket, is in pass order. One that passed before some in
/// the list (a head that met a pause after others that passed later met it on arriving) goes
/// in ahead of them: the list is rebuilt (tombstones dropped), as a list only grows at its
/// back.
fn push_in_pass_order(list: &mut WaitList<()>, pass: u32, waker: &Waker) -> u64 {
    let id = PASSED | u64::from(pass);
    let last = (list.records().checked_sub(1))
        .and_then(|index| list.get(index))
        .map(|waiter| waiter.ticket);
    match last {
        Some(last) if last >= id => {
            let taken =
                (0..list.records()).any(|index| list.get(index).is_some_and(|w| w.ticket == id));
            if taken {
                // Only after 2^32 passes: a ticket is never shared, the order is lost.
                list.push_back(last + 1, (), waker.clone());
                return last + 1;
            }
            insert_in_order(list, id, waker);
        }
        _ => list.push_back(id, (), waker.clone()),
    }
    id
}

/// [`push_in_pass_order`]'s rebuild of `list` with ticket `id` in its place.
#[cold]
fn insert_in_order(list: &mut WaitList<()>, id: u64, waker: &Waker) {
    let mut old = std::mem::take(list);
    let mut placed = false;
    while let Some(waiter) = old.pop_front() {
        // The head of a list is live (`pop_front` drops the tombstones that would lead).
        let Some(held) = waiter.waker else {
            continue;
        };
        if !placed && id < waiter.ticket {
            list.push_back(id, (), waker.clone());
            placed = true;
        }
        list.push_back(waiter.ticket, (), held);
    }
    if !placed {
        list.push_back(id, (), waker.clone());
    }
}

/// Takes one waiter off a depth gauge. Also run as a [`Place`] is dropped while the thread
/// unwinds: a metrics recorder's panic is then caught, as one escaping a drop would abort the
/// process.
fn leave_depth(depth: &metrics::Gauge) {
    kling_core::metrics::call_recorder(|| depth.decrement(1.0));
}

/// A place in a queue, given up on drop unless it was admitted.
#[derive(Debug)]
pub(crate) struct Place {
    pub(crate) queues: Arc<Queues>,
    pub(crate) key: BucketKey,
    /// The waiter's ticket; [`LEFT`] once it left.
    pub(crate) id: u64,
}

/// A [`Place`]'s id once it left (tickets never reach it): no field is added for the mark, so
/// a waiter's bookkeeping stays as small as it was.
const LEFT: u64 = u64::MAX;

impl Place {
    /// Its waiter was moved to another queue ([`Queues::release_held`]): nothing to leave.
    pub(crate) fn moved(mut self) {
        self.id = LEFT;
    }

    /// Leaves the queue now; true when this was the key's last live waiter.
    pub(crate) fn leave(mut self) -> bool {
        let id = std::mem::replace(&mut self.id, LEFT);
        self.queues.leave(&self.key, id)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        // Once only: an emptied queue is removed, and a new one for the key numbers its
        // waiters from zero again.
        if self.id != LEFT {
            self.queues.leave(&self.key, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use kling_core::waitlist::MAX_TOMBSTONES_KEPT;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// An account's queues (its account-wide key and a class key) share its depth gauge,
    /// which shows their sum.
    #[test]
    fn the_depth_gauge_shows_every_queue_of_the_account() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recorder = metrics::set_default_local_recorder(&recorder);
        // The debugging recorder hands a gauge's moves since the last snapshot over: add
        // them up, as a recorder that keeps the value does.
        let shown = std::cell::Cell::new(0.0);
        let depth = || {
            let snapshot = snapshotter.snapshot().into_vec();
            let mut depths = snapshot.iter().filter_map(|(key, _, _, value)| {
                let key = key.key();
                let account = key.labels().find(|l| l.key() == LABEL_ACCOUNT)?;
                // "a", unless a test in this process labelled too many accounts first.
                let a = kling_core::metrics::account_label("a");
                (key.name() == RATELIMIT_QUEUE_DEPTH && account.value() == a).then_some(value)
            });
            match depths.next() {
                Some(DebugValue::Gauge(moved)) => shown.set(shown.get() + moved.into_inner()),
                other => panic!("one depth gauge, not {other:?}"),
            }
            shown.get()
        };
        let queues = Queues::default();
        let account = Some(kling_core::AccountId::new("a"));
        let whole = BucketKey::account(account.clone());
        let class = BucketKey::class(account, kling_core::RequestKind::Query);
        let waker = Waker::noop();
        let mut ids = Vec::new();
        for key in [&whole, &whole, &whole, &class, &class] {
            ids.push((
                key,
                queues.enqueue(key, waker, None, Joins::ToAsk).unwrap().id,
            ));
        }
        assert_eq!(depth(), 5.0);
        // One leaves each queue: the one left in the class queue's head, the other behind.
        let (key, id) = ids[3];
        queues.leave(key, id);
        let (key, id) = ids[1];
        queues.leave(key, id);
        assert_eq!(depth(), 3.0);
        for &(key, id) in &ids {
            queues.leave(key, id);
        }
        assert_eq!(depth(), 0.0);
    }

    /// A place whose first ask is on its way is not waiting: the depth gauge, `waiting` and
    /// `depth` leave it out, as `max_queue` does, until it is refused and waits
    /// ([`Queues::settle`]); one that leaves while asking takes nothing off the gauge. Places
    /// taken either way (asking as it joins, or marked after) count the same.
    #[test]
    fn a_first_ask_on_its_way_is_not_counted_as_waiting() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recorder = metrics::set_default_local_recorder(&recorder);
        let shown = std::cell::Cell::new(0.0);
        let gauge = || {
            for (key, _, _, value) in snapshotter.snapshot().into_vec() {
                if key.key().name() == RATELIMIT_QUEUE_DEPTH
                    && let DebugValue::Gauge(moved) = value
                {
                    shown.set(shown.get() + moved.into_inner());
                }
            }
            shown.get()
        };
        let queues = Queues::default();
        let key = BucketKey::account(Some(kling_core::AccountId::new("a")));
        let waker = Waker::noop();
        let counts = |queues: &Queues| (queues.waiting(), queues.depth(&key));
        // Asking as it joins (it had no place), and joining then asking.
        let first = queues.enqueue(&key, waker, None, Joins::Asking).unwrap();
        let second = queues.enqueue(&key, waker, None, Joins::ToAsk).unwrap();
        assert!(first.is_head && second.is_head, "both ask");
        assert_eq!((counts(&queues), gauge()), ((1, 1), 1.0));
        queues.ask_in_flight(&key, second.id);
        assert_eq!((counts(&queues), gauge()), ((0, 0), 0.0));
        assert!(!queues.is_idle(), "both hold a place");
        // Refused: it waits.
        assert_eq!(queues.settle(&key, second.id, None), Ok(()));
        assert_eq!((counts(&queues), gauge()), ((1, 1), 1.0));
        // Leaving while asking takes nothing off.
        assert!(!queues.leave(&key, first.id));
        assert_eq!((counts(&queues), gauge()), ((1, 1), 1.0));
        assert!(queues.leave(&key, second.id));
        assert_eq!((counts(&queues), gauge()), ((0, 0), 0.0));
        assert!(queues.is_idle());
    }

    /// `max_queue` leaves room for the first asks on their way that came before a request:
    /// one refused at its first ask after a later one was, or one refused already as it joins,
    /// is counted behind them; one that joins to ask is not refused for them; one refused
    /// at a first ask that came after every ask still on its way is bounded by the waiters.
    #[test]
    fn the_bound_leaves_room_for_first_asks_that_came_before() {
        let queues = Queues::default();
        let key = BucketKey::account(None);
        let waker = Waker::noop();
        let max = Some(1);
        let early = queues.enqueue(&key, waker, None, Joins::Asking).unwrap();
        let late = queues.enqueue(&key, waker, None, Joins::Asking).unwrap();
        assert!(queues.enqueue(&key, waker, max, Joins::Refused).is_err());
        let asks = queues.enqueue(&key, waker, max, Joins::ToAsk).unwrap();
        assert!(asks.is_head, "it asks too");
        assert!(!queues.leave(&key, asks.id));
        // The later answer first: no place is taken from the earlier ask.
        assert_eq!(queues.settle(&key, late.id, max), Err(()));
        assert!(!queues.leave(&key, late.id));
        assert_eq!(queues.settle(&key, early.id, max), Ok(()));
        assert_eq!(queues.depth(&key), 1);
        // Now one waits: a request that comes must queue, and is refused.
        assert!(queues.enqueue(&key, waker, max, Joins::ToAsk).is_err());
        assert!(queues.leave(&key, early.id));
        assert_eq!(queues.waiting(), 0);
    }

    /// Accounts past the ones a process labels by id share the `other` series: however many
    /// accounts requests name, the depth gauge's series stay bounded.
    #[test]
    fn accounts_past_the_labelled_ones_share_one_depth_series() {
        use kling_core::metrics::{ACCOUNT_LABELS, OTHER_ACCOUNT_LABEL};

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recorder = metrics::set_default_local_recorder(&recorder);
        let queues = Queues::default();
        let waker = Waker::noop();
        let accounts = ACCOUNT_LABELS + 10;
        for n in 0..accounts {
            let account = kling_core::AccountId::new(format!("depth-label-test-{n}"));
            let key = BucketKey::account(Some(account));
            queues.enqueue(&key, waker, None, Joins::ToAsk).unwrap();
        }
        let mut series = std::collections::HashMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            let Some(account) = key.labels().find(|l| l.key() == LABEL_ACCOUNT) else {
                continue;
            };
            if key.name() == RATELIMIT_QUEUE_DEPTH
                && let DebugValue::Gauge(moved) = value
            {
                series.insert(account.value().to_owned(), moved.into_inner());
            }
        }
        assert!(
            series.len() <= ACCOUNT_LABELS + 1,
            "{} series",
            series.len()
        );
        let other = series.get(OTHER_ACCOUNT_LABEL).copied().unwrap_or(0.0);
        let named = series.len() - usize::from(other > 0.0);
        assert_eq!(named as f64 + other, accounts as f64, "{series:?}");
        assert!(other >= 10.0, "{series:?}");
    }

    /// A metrics recorder whose depth gauges panic at their next increment (`up`) or
    /// decrement (`down`) while the flag is set (once each), or at every call (`every`).
    #[derive(Clone, Default)]
    struct PanickyDepth {
        up: Arc<AtomicBool>,
        down: Arc<AtomicBool>,
        every: Arc<AtomicBool>,
    }

    impl PanickyDepth {
        fn touch(&self, flag: &AtomicBool) {
            let panics = flag.swap(false, Ordering::SeqCst) || self.every.load(Ordering::SeqCst);
            assert!(!panics, "the metrics recorder panics");
        }
    }

    impl metrics::GaugeFn for PanickyDepth {
        fn increment(&self, _: f64) {
            self.touch(&self.up);
        }
        fn decrement(&self, _: f64) {
            self.touch(&self.down);
        }
        fn set(&self, _: f64) {
            self.touch(&self.every);
        }
    }

    impl metrics::Recorder for PanickyDepth {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            metrics::Counter::noop()
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::from_arc(Arc::new(self.clone()))
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    fn unwinds(f: impl FnOnce()) -> bool {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err()
    }

    /// A metrics recorder that panics as a request joins a queue leaves no waiter behind.
    /// Before, the request joined and then the depth gauge moved: the panic unwound before
    /// the caller held a place for it, so it stayed the queue's head for good, polled by
    /// nobody, and every later request of the key waited behind it for ever.
    #[test]
    fn a_recorder_panicking_as_a_request_joins_leaves_no_head_nobody_polls() {
        let recorder = PanickyDepth::default();
        let _recorder = metrics::set_default_local_recorder(&recorder);
        let queues = Queues::default();
        let account = Some(kling_core::AccountId::new("a"));
        let whole = BucketKey::account(account.clone());
        let class = BucketKey::class(account, RequestKind::Query);
        let waker = Waker::noop();
        let joins: [(&BucketKey, &dyn Fn() -> Ticket); 4] = [
            (&whole, &|| {
                queues.enqueue(&whole, waker, None, Joins::ToAsk).unwrap()
            }),
            (&class, &|| queues.enqueue_returned(&class, waker, 0)),
            (&class, &|| queues.hold(&class, waker, false)),
            (&class, &|| queues.hold(&class, waker, true)),
        ];
        for (key, join) in joins {
            recorder.up.store(true, Ordering::SeqCst);
            assert!(unwinds(|| {
                join();
            }));
            assert_eq!(queues.waiting(), 0, "nobody waits");
            let ticket = join();
            assert!(ticket.is_head, "no head before it");
            queues.leave(key, ticket.id);
            assert_eq!(queues.waiting(), 0);
        }
    }

    /// A metrics recorder that panics as a held class request goes back to its account's
    /// queue, or as it leaves that queue, holds nothing up. Before, a panic at the class's
    /// depth gauge came after the request left its class's held list and before it joined
    /// its account's queue: it was in neither, and its place found it nowhere. A panic as it
    /// left its account's queue came before its class was told, and every later held request
    /// of the class waited for it for ever.
    #[test]
    fn a_recorder_panicking_as_a_held_request_moves_holds_nothing_up() {
        let recorder = PanickyDepth::default();
        let _recorder = metrics::set_default_local_recorder(&recorder);
        let queues = Queues::default();
        let account = Some(kling_core::AccountId::new("a"));
        let whole = BucketKey::account(account.clone());
        let class = BucketKey::class(account, RequestKind::Query);
        let waker = Waker::noop();
        let held = queues.hold(&class, waker, false);
        assert!(held.is_head);
        for flag in [&recorder.down, &recorder.up] {
            flag.store(true, Ordering::SeqCst);
            assert!(unwinds(|| {
                queues.release_held(&class, held.id, &whole, waker);
            }));
            assert_eq!(
                queues.poll_head(&class, held.id, waker),
                Ok(true),
                "still held"
            );
            assert_eq!(
                queues.depth(&whole),
                0,
                "nothing joined the account's queue"
            );
        }
        let back = queues.release_held(&class, held.id, &whole, waker);
        assert!(back.is_head);
        assert_eq!(queues.class_turn(&class, None), ClassTurn::Behind);
        recorder.down.store(true, Ordering::SeqCst);
        assert!(unwinds(|| {
            queues.leave(&whole, back.id);
        }));
        assert_eq!(
            queues.class_turn(&class, None),
            ClassTurn::Free,
            "the class goes on"
        );
        assert_eq!(queues.waiting(), 0);
        assert_eq!(queues.reserved_bytes(), 0, "no queue is left");
    }

    /// A metrics recorder that panics as a first ask is marked on its way, or as it is
    /// refused and waits, leaves the mark as the gauge is: not marked (still counted) when
    /// the gauge was not taken down, still marked (not counted) when it was not put back up.
    /// Either way leaving takes off the gauge what it shows, and no ask is left counted.
    #[test]
    fn a_recorder_panic_as_a_first_ask_is_marked_or_settled_keeps_the_mark_with_the_gauge() {
        let recorder = PanickyDepth::default();
        let _recorder = metrics::set_default_local_recorder(&recorder);
        let queues = Queues::default();
        let key = BucketKey::account(Some(kling_core::AccountId::new("a")));
        let waker = Waker::noop();
        let ticket = queues.enqueue(&key, waker, None, Joins::ToAsk).unwrap();
        recorder.down.store(true, Ordering::SeqCst);
        assert!(unwinds(|| queues.ask_in_flight(&key, ticket.id)));
        assert_eq!((queues.waiting(), queues.depth(&key)), (1, 1), "not marked");
        queues.ask_in_flight(&key, ticket.id);
        assert_eq!((queues.waiting(), queues.depth(&key)), (0, 0), "marked");
        recorder.up.store(true, Ordering::SeqCst);
        assert!(unwinds(|| {
            let _ = queues.settle(&key, ticket.id, Some(1));
        }));
        assert_eq!(queues.depth(&key), 0, "still marked");
        assert!(queues.leave(&key, ticket.id));
        assert_eq!(queues.asking.load(Ordering::Relaxed), 0);
        assert!(queues.is_idle());
        assert_eq!(queues.reserved_bytes(), 0, "the queue is dropped");
    }

    /// A place dropped while the thread unwinds, under a metrics recorder that panics at every
    /// call, leaves its queue without aborting the process (a panic escaping a drop during
    /// unwinding aborts): the recorder's panic is caught.
    #[test]
    fn a_place_dropped_while_unwinding_survives_a_panicking_recorder() {
        let recorder = PanickyDepth::default();
        let _recorder = metrics::set_default_local_recorder(&recorder);
        let queues = Arc::new(Queues::default());
        let key = BucketKey::account(Some(kling_core::AccountId::new("a")));
        let ticket = queues
            .enqueue(&key, Waker::noop(), None, Joins::ToAsk)
            .unwrap();
        let place = Place {
            queues: Arc::clone(&queues),
            key,
            id: ticket.id,
        };
        recorder.every.store(true, Ordering::SeqCst);
        assert!(unwinds(move || {
            let _place = place;
            panic!("the caller panics");
        }));
        recorder.every.store(false, Ordering::SeqCst);
        assert_eq!(queues.waiting(), 0, "it left");
    }

    /// A request back from the account gate leads a class queue at once, ahead of its head and
    /// of the requests behind it; the head it displaced may no longer set the queue's hint, and
    /// leads again once the returned ones left (those that gave up behind included).
    #[test]
    fn a_returned_request_leads_until_it_leaves() {
        let queues = Queues::default();
        let account = Some(kling_core::AccountId::new("a"));
        let key = BucketKey::class(account, kling_core::RequestKind::Account);
        let waker = Waker::noop();
        let at = Instant::now();
        let head = queues.enqueue(&key, waker, Some(2), Joins::ToAsk).unwrap();
        let behind = queues.enqueue(&key, waker, Some(2), Joins::ToAsk).unwrap();
        assert!(head.is_head && !behind.is_head);
        assert!(queues.set_head_not_before(&key, head.id, at, false));
        assert!(
            queues.enqueue(&key, waker, Some(2), Joins::ToAsk).is_err(),
            "full"
        );
        // No `max_queue` for the ones coming back.
        let back = queues.enqueue_returned(&key, waker, 0);
        let second = queues.enqueue_returned(&key, waker, 1);
        assert!(back.is_head && !second.is_head);
        assert_eq!(queues.depth(&key), 4);
        assert_eq!(queues.poll_head(&key, back.id, waker), Ok(true));
        assert_eq!(
            queues.poll_head(&key, second.id, waker),
            Err(Some((at, false)))
        );
        assert!(queues.poll_head(&key, head.id, waker).is_err());
        assert!(!queues.set_head_not_before(&key, head.id, at, true));
        assert!(queues.set_head_not_before(&key, back.id, at, true));
        assert_eq!(
            queues.poll_head(&key, head.id, waker),
            Err(Some((at, true)))
        );
        // The displaced head leaving clears nothing of the one that leads.
        assert!(!queues.leave(&key, head.id));
        assert_eq!(
            queues.poll_head(&key, second.id, waker),
            Err(Some((at, true)))
        );
        assert!(!queues.leave(&key, back.id));
        assert_eq!(queues.poll_head(&key, second.id, waker), Ok(true));
        assert_eq!(queues.poll_head(&key, behind.id, waker), Err(None));
        assert!(!queues.leave(&key, second.id));
        assert_eq!(queues.poll_head(&key, behind.id, waker), Ok(true));
        assert!(queues.leave(&key, behind.id), "the last one");
        assert_eq!(queues.waiting(), 0);
        assert_eq!(queues.reserved_bytes(), 0, "the queue is dropped");
    }

    /// A head that meets a pause wakes the waiters behind it only when one of them noted a
    /// limit before the pause's end, once per pause (an extension past a limit noted since
    /// wakes them again); pacing, a pause within every limit, or no limit wakes nobody.
    #[test]
    fn a_pause_past_a_waiters_limit_wakes_those_behind_once() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        use std::task::Wake;

        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let woken = || count.0.swap(0, Ordering::SeqCst);
        let waker = Waker::from(Arc::clone(&count));
        let queues = Queues::default();
        let key = BucketKey::account(Some(kling_core::AccountId::new("a")));
        let now = Instant::now();
        let secs = |n| now + std::time::Duration::from_secs(n);
        let head = queues
            .enqueue(&key, Waker::noop(), None, Joins::ToAsk)
            .unwrap();
        let unbounded = queues.enqueue(&key, &waker, None, Joins::ToAsk).unwrap();
        let bounded = queues.enqueue(&key, &waker, None, Joins::ToAsk).unwrap();
        assert!(
            queues
                .poll_behind(&key, unbounded.id, &waker, None)
                .is_err()
        );
        assert!(queues.set_head_not_before(&key, head.id, secs(100), true));
        assert_eq!(woken(), 0, "no limit noted");
        assert!(queues.set_head_not_before(&key, head.id, secs(10), false));
        assert!(
            queues
                .poll_behind(&key, bounded.id, &waker, Some(secs(50)))
                .is_err()
        );
        assert!(queues.set_head_not_before(&key, head.id, secs(50), true));
        assert_eq!(woken(), 0, "pacing, and a pause within the limit");
        assert!(queues.set_head_not_before(&key, head.id, secs(60), true));
        assert_eq!(woken(), 2, "both behind the head, not the head");
        assert!(queues.set_head_not_before(&key, head.id, secs(60), true));
        assert_eq!(woken(), 0, "the same pause: cleared by the wake");
        // One the hint fails at once notes nothing: it leaves, and would wake them again.
        assert_eq!(
            queues.poll_behind(&key, bounded.id, &waker, Some(secs(55))),
            Err(Some((secs(60), true)))
        );
        assert!(queues.set_head_not_before(&key, head.id, secs(62), true));
        assert_eq!(woken(), 0, "no limit left behind");
        assert!(
            queues
                .poll_behind(&key, bounded.id, &waker, Some(secs(70)))
                .is_err()
        );
        assert!(queues.set_head_not_before(&key, head.id, secs(65), true));
        assert_eq!(woken(), 0);
        assert!(queues.set_head_not_before(&key, head.id, secs(80), true));
        assert_eq!(woken(), 2, "extended past the limit noted since");
    }

    /// The record of a class's sends is GCRA on the send instants: a burst of two lets the
    /// second go at once and the third a period after the first; a record past its time is
    /// dropped, and with the last one the flag that makes `call` ask falls.
    #[test]
    fn class_sends_follow_the_class_quota_and_expire() {
        let queues = Queues::default();
        let key = BucketKey::class(None, kling_core::RequestKind::Account);
        let quota = Quota::per_second(1.0).with_burst(2);
        let t = Instant::now();
        assert!(!queues.keeps_class_sends());
        assert_eq!(queues.class_send_at(&key, quota, t), None);
        queues.note_class_sent(&key, quota, t);
        assert!(queues.keeps_class_sends());
        assert_eq!(
            queues.class_send_at(&key, quota, t),
            None,
            "the burst's second"
        );
        queues.note_class_sent(&key, quota, t);
        let second = std::time::Duration::from_secs(1);
        assert_eq!(queues.class_send_at(&key, quota, t), Some(t + second));
        assert_eq!(
            queues.class_send_at(&key, Quota::per_second(1.0), t),
            Some(t + 2 * second)
        );
        assert_eq!(queues.class_send_at(&key, quota, t + second), None);
        assert!(queues.keeps_class_sends(), "still binds a burst-1 quota");
        assert_eq!(queues.class_send_at(&key, quota, t + 2 * second), None);
        assert!(!queues.keeps_class_sends(), "dropped");
    }

    /// A look at one class key's record of sends looks at that key's alone: another key's
    /// running record neither makes it run nor is dropped by it; a record past its time is
    /// dropped when its key is looked at, and every one once the latest is past.
    #[test]
    fn class_records_are_looked_at_per_key() {
        let queues = Queues::default();
        let a = BucketKey::class(Some(kling_core::AccountId::new("a")), RequestKind::Account);
        let b = BucketKey::class(Some(kling_core::AccountId::new("b")), RequestKind::Account);
        let quota = Quota::per_second(1.0);
        let second = std::time::Duration::from_secs(1);
        let t = Instant::now();
        queues.note_class_sent(&b, quota, t);
        queues.note_class_sent(&a, quota, t + second / 2);
        let later = t + second + second / 5;
        assert!(!queues.class_sends_running(&b, quota, later));
        // `b`'s look dropped its own record, past its time, and left `a`'s...
        assert_eq!(queues.class_sends.lock().unwrap().records.len(), 1);
        assert!(queues.class_sends_running(&a, quota, later));
        assert!(queues.keeps_class_sends());
        // ...and the next look at any key, with the latest past, drops them all.
        let c = BucketKey::class(Some(kling_core::AccountId::new("c")), RequestKind::Account);
        assert!(!queues.class_sends_running(&c, quota, t + 2 * second));
        assert!(queues.class_sends.lock().unwrap().records.is_empty());
        assert!(!queues.keeps_class_sends());
        // A slower quota moves a running record on, and the latest with it.
        queues.note_class_sent(&a, quota, t + 2 * second);
        assert_eq!(
            queues.class_send_at(&a, Quota::per_second(0.5), t + 2 * second),
            Some(t + 4 * second)
        );
        assert!(!queues.class_sends_running(&c, quota, t + 3 * second));
        assert!(queues.class_sends_running(&a, Quota::per_second(0.5), t + 3 * second));
    }

    /// Held class requests ([`Queues::hold`]) wait beside the class gate's queue, the first
    /// leading them; a class request at the account's head stands behind them. The first one
    /// released goes to the front of the account's queue, ahead of its head, and the next one
    /// leads only once it left that queue; then the queues are dropped.
    #[test]
    fn held_class_requests_go_back_to_their_account_one_at_a_time() {
        let queues = Queues::default();
        let account = Some(kling_core::AccountId::new("a"));
        let whole = BucketKey::account(account.clone());
        let class = BucketKey::class(account, kling_core::RequestKind::Account);
        let waker = Waker::noop();
        let gate_head = queues.enqueue(&class, waker, None, Joins::ToAsk).unwrap();
        let account_head = queues.enqueue(&whole, waker, None, Joins::ToAsk).unwrap();
        assert_eq!(
            queues.class_turn(&class, Some(account_head.id)),
            ClassTurn::Free
        );
        let first = queues.hold(&class, waker, false);
        let second = queues.hold(&class, waker, false);
        assert!(first.is_head && !second.is_head);
        // Held ones wait for the class key but never ask its backend.
        assert_eq!((queues.depth(&class), queues.asking(&class)), (3, 1));
        assert_eq!(
            queues.poll_head(&class, gate_head.id, waker),
            Ok(true),
            "beside"
        );
        assert_eq!(queues.poll_head(&class, first.id, waker), Ok(true));
        assert!(queues.poll_head(&class, second.id, waker).is_err());
        assert_eq!(
            queues.class_turn(&class, Some(account_head.id)),
            ClassTurn::Behind
        );
        assert_eq!(queues.waiting(), 4);
        let out = queues.release_held(&class, first.id, &whole, waker);
        assert!(out.is_head, "ahead of the account's head");
        assert!(queues.poll_head(&whole, account_head.id, waker).is_err());
        assert!(
            queues.poll_head(&class, second.id, waker).is_err(),
            "waits for the one out"
        );
        assert_eq!(queues.class_turn(&class, Some(out.id)), ClassTurn::Out);
        assert_eq!(
            queues.class_turn(&class, Some(account_head.id)),
            ClassTurn::Behind
        );
        assert_eq!(queues.waiting(), 4);
        assert!(!queues.leave(&whole, out.id));
        assert_eq!(queues.poll_head(&whole, account_head.id, waker), Ok(true));
        assert_eq!(queues.poll_head(&class, second.id, waker), Ok(true));
        assert!(!queues.leave(&class, second.id));
        assert_eq!(
            queues.class_turn(&class, Some(account_head.id)),
            ClassTurn::Free
        );
        assert!(queues.leave(&class, gate_head.id));
        assert!(queues.leave(&whole, account_head.id));
        assert_eq!(queues.waiting(), 0);
        assert!(queues.lock().is_empty(), "the queues are dropped");
    }

    /// The held request out at its account's queue and held there again (`again`) leads the
    /// held requests that came after it: it is released first, and they follow in order.
    #[test]
    fn a_class_request_held_again_leads_the_held_ones() {
        let queues = Queues::default();
        let account = Some(kling_core::AccountId::new("a"));
        let whole = BucketKey::account(account.clone());
        let class = BucketKey::class(account, RequestKind::Account);
        let waker = Waker::noop();
        let first = queues.hold(&class, waker, false);
        let out = queues.release_held(&class, first.id, &whole, waker);
        let second = queues.hold(&class, waker, false);
        assert!(!second.is_head, "waits for the one out");
        assert_eq!(queues.class_turn(&class, Some(out.id)), ClassTurn::Out);
        // Held again: it joins while still out, then leaves the account's queue.
        let again = queues.hold(&class, waker, true);
        assert!(!again.is_head);
        assert!(queues.leave(&whole, out.id), "the account's last");
        assert_eq!(queues.poll_head(&class, again.id, waker), Ok(true));
        assert!(queues.poll_head(&class, second.id, waker).is_err());
        assert_eq!(queues.class_turn(&class, None), ClassTurn::Behind);
        let out = queues.release_held(&class, again.id, &whole, waker);
        assert!(queues.poll_head(&class, second.id, waker).is_err());
        assert!(queues.leave(&whole, out.id), "the account's last");
        assert_eq!(queues.poll_head(&class, second.id, waker), Ok(true));
        assert!(!queues.leave(&class, second.id));
        assert_eq!(queues.waiting(), 0);
        assert!(queues.lock().is_empty(), "the queues are dropped");
    }

    /// Behind a head that never moves, requests that give up leave no more tombstones than
    /// there are waiters (beyond a few), and the others keep their turns in order.
    #[test]
    fn tombstones_behind_a_waiting_head_stay_bounded() {
        let queues = Queues::default();
        let key = BucketKey::account(None);
        let waker = Waker::noop();
        let ids: Vec<u64> = (0..1_000)
            .map(|_| queues.enqueue(&key, waker, None, Joins::ToAsk).unwrap().id)
            .collect();
        let leaving: Vec<u64> = ids[500..]
            .iter()
            .chain(&ids[1..500])
            .copied()
            .filter(|id| id % 10 != 0)
            .collect();
        for (n, &id) in leaving.iter().enumerate() {
            assert!(!queues.leave(&key, id), "others still wait");
            let waiting = 1_000 - (n + 1);
            assert_eq!(queues.depth(&key), waiting);
            let entries = queues.lock()[&key].waiters.records();
            assert!(
                entries <= 2 * waiting + MAX_TOMBSTONES_KEPT + 1,
                "{entries} entries for {waiting} waiters"
            );
        }
        // The head is still the head; the rest follow it in arrival order.
        let staying: Vec<u64> = ids.iter().copied().filter(|id| id % 10 == 0).collect();
        assert_eq!(queues.poll_head(&key, staying[0], waker), Ok(true));
        for &id in &staying[1..] {
            assert!(queues.poll_head(&key, id, waker).is_err(), "{id} waits");
        }
        for (n, &id) in staying.iter().enumerate() {
            assert_eq!(queues.leave(&key, id), n == staying.len() - 1);
            if let Some(&next) = staying.get(n + 1) {
                assert_eq!(queues.poll_head(&key, next, waker), Ok(true));
            }
        }
    }
}
