//! Accounting: tasks, slots, credits, request-rate GCRA and counters, all behind one mutex.
//!
//! Everything is computed lazily from `tokio::time::Instant`: a task ends when the clock passes
//! its end, so slots free themselves and paused-time tests need no timers.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::config::{MAX_WAIT, MockConfig, RetryAfterMode, Switches};
use crate::stats::{MAX_STATS_POOLS, Stats};
use crate::task::{Clock, Generation, Phase, Task, task_seq};

/// How long a result URL works after its task ended (API time): Kling's expire after 30 days.
pub(crate) const OUTPUT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long a task stays queryable after it ended (API time); later it answers as an unknown
/// task does (404, code 1203). Kling publishes no figure for its tasks (KLING_API.md gives 30
/// days for output URLs): the mock keeps a task as long as its URLs work, and forgets it then,
/// so a long run holds one retention window of tasks, not every task it ever made.
pub(crate) const TASK_RETENTION: Duration = OUTPUT_LIFETIME;

/// The shortest a task is kept after it ended, in real time, whatever the speed: at `speed`
/// 10¹⁵ the 30 days are nanoseconds, less than a round trip, and a client could never see its
/// task end.
pub(crate) const MIN_RETENTION: Duration = Duration::from_secs(1);

/// Where a task's external id is looked up, and so unique: its legacy create path, or `""`
/// for new-style tasks (all in `/tasks`).
pub(crate) fn external_scope(generation: &Generation) -> &str {
    match generation {
        Generation::Legacy { endpoint } => endpoint,
        Generation::New { .. } => "",
    }
}

/// The HTTP status Kling sends with a business code.
pub(crate) fn http_status(code: u32) -> StatusCode {
    match code {
        0 => StatusCode::OK,
        1000..=1004 => StatusCode::UNAUTHORIZED,
        1100 | 1101 | 1102 | 1302 | 1303 | 1304 => StatusCode::TOO_MANY_REQUESTS,
        1103 => StatusCode::FORBIDDEN,
        1200 | 1201 | 1300 | 1301 => StatusCode::BAD_REQUEST,
        1202 | 1203 => StatusCode::NOT_FOUND,
        5001 => StatusCode::SERVICE_UNAVAILABLE,
        5002 => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// One GCRA decision on a theoretical arrival time: `Ok` with the new TAT when a request at
/// `now` passes, else the wait and the TAT to keep (pushed one interval by the penalty mode).
fn gcra(
    tat: Option<Instant>,
    interval: Duration,
    tolerance: Duration,
    penalty: bool,
    now: Instant,
) -> Result<Instant, (Duration, Instant)> {
    let tat = tat.map_or(now, |t| t.max(now));
    if tat <= now + tolerance {
        Ok(tat + interval)
    } else {
        // The penalty pushes at most MAX_WAIT past the tolerance: a client that keeps sending
        // through a lockout never drives the wait beyond what an `Instant` or an HTTP-date
        // (year 9999 at most) can hold.
        let kept = if penalty {
            (tat + interval).min(now + tolerance + MAX_WAIT).max(tat)
        } else {
            tat
        };
        Err((kept.saturating_duration_since(now + tolerance), kept))
    }
}

/// A slot held by "another tenant" of the account, set through [`crate::MockKling::occupy`].
#[derive(Debug, Clone)]
struct Occupation {
    pool: String,
    slots: u32,
    until: Instant,
}

/// Per-account state: everything Kling keys by account (not by API key).
#[derive(Debug, Default)]
pub(crate) struct Account {
    /// Every task of the account still kept, by number (`State::tasks`' key), oldest first.
    pub(crate) tasks: BTreeSet<u64>,
    /// Tasks not yet seen ended.
    active: Vec<u64>,
    /// (Where the id is queried, external id) → task number. An external id is unique where it
    /// can be looked up: a legacy create path (`GET {path}/{id}`), or `""` for new-style tasks
    /// (`GET /tasks?external_task_ids=`); one path's id taken on another made a duplicate
    /// nobody could find.
    pub(crate) external: HashMap<(String, String), u64>,
    /// GCRA theoretical arrival time.
    tat: Option<Instant>,
    /// GCRA theoretical arrival time of `/account/costs`.
    costs_tat: Option<Instant>,
    /// Every request is refused 1302 until then ([`MockConfig::rate_lockout`]).
    locked_until: Option<Instant>,
    /// Start of the current credit period (set by the account's first create, when the
    /// configuration has a period).
    credit_period_start: Option<Instant>,
    /// Credits charged in the current credit period (all time without a period).
    charged: u64,
    /// Refunds of failed tasks created in the current credit period.
    refunded: u64,
    /// When the first 1102 of the credit period was answered (built, whatever then became of
    /// the answer); from then on every create of the period gets 1102.
    first_1102: Option<Instant>,
    /// When the client was first sent an 1102 it could read in this credit period: an answer
    /// sent as it was built, or a slow one when it went out; never a lost or garbled one.
    /// [`Stats::creates_after_1102`] counts from here.
    seen_1102: Option<Instant>,
    occupied: Vec<Occupation>,
    /// This account's own state (1100 / 1101 / 1304), on top of the mock-wide switches.
    pub(crate) switches: Switches,
    /// The number of the account's last sighting, [`State::seen`]'s key (open mode forgets the
    /// least recently seen idle account first; a count, as paused time gives many requests
    /// one instant).
    last_seen: u64,
}

/// The mutable heart of the mock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) config: MockConfig,
    pub(crate) clock: Clock,
    pub(crate) switches: Switches,
    pub(crate) rng: StdRng,
    /// The tasks kept (ended less than [`TASK_RETENTION`] ago, or running), by number: the
    /// number is never reused, so removing a task moves no other.
    pub(crate) tasks: HashMap<u64, Task>,
    /// The last task number given.
    last_seq: u64,
    /// (When it is forgotten, number) of every kept task, soonest first.
    pub(crate) expiry: BinaryHeap<Reverse<(Instant, u64)>>,
    pub(crate) accounts: HashMap<String, Account>,
    pub(crate) stats: Stats,
    next_request: u64,
    /// Sightings of accounts so far (requests let in by [`State::admit`], accounts made),
    /// numbering each account's last one.
    admitted: u64,
    /// Every account by the number of its last sighting, oldest first: open mode finds the one
    /// to forget without going through them all.
    pub(crate) seen: BTreeMap<u64, String>,
    /// Set while the answer being built will not be sent as it is built, now: lost (the
    /// `lost_answer_rate` fault), garbled (`malformed_rate`) or late (`slow_rate`). It is not
    /// counted by its code then (counted and then taken back, a lost one showed in a snapshot
    /// read between the two); its code is kept in [`State::held_code`] for a late answer to be
    /// counted when it is sent.
    pub(crate) holding_answer: bool,
    /// The code of the last answer built while [`State::holding_answer`] was set.
    pub(crate) held_code: Option<u32>,
    /// The account and time of an 1102 built while [`State::holding_answer`] was set: a slow
    /// one is seen by the client only when it is sent ([`State::saw_late_1102`]).
    pub(crate) held_1102: Option<(String, Instant)>,
}

/// Why [`State::set_switches_of`] set nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SwitchesRefused {
    /// Keyed mode, and no configured key is of the account: no request could be it.
    UnknownAccount,
    /// Open mode, [`MockConfig::max_open_accounts`] held and none idle.
    NoRoom,
}

impl Account {
    /// Whether forgetting the account changes nothing a client could be waiting on: no task
    /// running, no occupation, no switches of its own, rate limits at rest.
    fn is_idle(&self, tasks: &HashMap<u64, Task>, now: Instant) -> bool {
        self.active
            .iter()
            .all(|i| tasks.get(i).is_none_or(|t| t.end <= now))
            && self.occupied.iter().all(|o| o.until <= now)
            && self.switches == Switches::default()
            && self.tat.is_none_or(|t| t <= now)
            && self.costs_tat.is_none_or(|t| t <= now)
            && self.locked_until.is_none_or(|t| t <= now)
    }

    /// Moves the credit period on by whole periods once it has ended: the budget comes back
    /// in full and the 1102 latch is lifted (the 1102 the client saw too).
    fn roll_credit_period(&mut self, period: Option<Duration>, now: Instant) {
        let (Some(period), Some(start)) = (period, self.credit_period_start) else {
            return;
        };
        if period.is_zero() || now < start + period {
            return;
        }
        let elapsed = now - start;
        let periods = elapsed.as_nanos() / period.as_nanos();
        let advance = u32::try_from(periods)
            .ok()
            .and_then(|n| period.checked_mul(n))
            .unwrap_or(elapsed);
        self.credit_period_start = Some(start + advance);
        self.charged = 0;
        self.refunded = 0;
        self.first_1102 = None;
        self.seen_1102 = None;
    }
}

impl State {
    pub(crate) fn new(config: MockConfig, clock: Clock) -> Self {
        State {
            switches: config.switches,
            rng: StdRng::seed_from_u64(config.seed),
            config,
            clock,
            tasks: HashMap::new(),
            last_seq: 0,
            expiry: BinaryHeap::new(),
            accounts: HashMap::new(),
            stats: Stats::default(),
            next_request: 0,
            admitted: 0,
            seen: BTreeMap::new(),
            holding_answer: false,
            held_code: None,
            held_1102: None,
        }
    }

    /// A uniform draw in `[0, 1)`.
    pub(crate) fn draw(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// Whether an event of probability `p` happens (never draws for `p == 0`, so adding a zero
    /// rate does not change the sequence of other draws).
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.draw() < p
    }

    fn request_id(&mut self) -> String {
        self.next_request += 1;
        format!(
            "mock-{:08x}-{:012x}",
            self.config.seed as u32, self.next_request
        )
    }

    /// The switches in force for `account`: each one on when it is on mock-wide or for the
    /// account.
    pub(crate) fn switches_for(&self, account: &str) -> Switches {
        let own = self
            .accounts
            .get(account)
            .map(|a| a.switches)
            .unwrap_or_default();
        Switches::new()
            .abnormal(self.switches.abnormal || own.abnormal)
            .arrears(self.switches.arrears || own.arrears)
            .ip_denied(self.switches.ip_denied || own.ip_denied)
            .throttled(self.switches.throttled || own.throttled)
    }

    /// Counts a response by its code, unless it is held ([`State::holding_answer`]): then its
    /// code is kept in [`State::held_code`].
    fn count_code(&mut self, code: u32) {
        if self.holding_answer {
            self.held_code = Some(code);
            return;
        }
        self.count_sent(code);
    }

    /// Counts a response sent with `code` (a held one, when it is sent at last).
    pub(crate) fn count_sent(&mut self, code: u32) {
        *self
            .stats
            .responses_by_code
            .entry(code.to_string())
            .or_default() += 1;
    }

    /// The common headers: JSON content type and a `Date` from the mock's clock.
    fn base_response(
        &self,
        status: StatusCode,
        body: Bytes,
        now: Instant,
    ) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(body));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(self.clock.wall(now))) {
            resp.headers_mut().insert(header::DATE, date);
        }
        resp
    }

    /// A success envelope around `data`.
    pub(crate) fn ok(&mut self, data: Value, now: Instant) -> Response<Full<Bytes>> {
        let mut body = serde_json::Map::new();
        body.insert("code".into(), json!(0));
        body.insert("message".into(), json!("SUCCEED"));
        body.insert("request_id".into(), json!(self.request_id()));
        body.insert("data".into(), data);
        let body = Value::Object(body);
        self.count_code(0);
        self.base_response(StatusCode::OK, Bytes::from(body.to_string()), now)
    }

    /// An error envelope (no `data`), with `Retry-After` when a wait is known and the mode asks.
    pub(crate) fn error(
        &mut self,
        code: u32,
        message: &str,
        now: Instant,
        wait: Option<Duration>,
    ) -> Response<Full<Bytes>> {
        let body = json!({
            "code": code,
            "message": message,
            "request_id": self.request_id(),
        });
        self.count_code(code);
        let mut resp = self.base_response(http_status(code), Bytes::from(body.to_string()), now);
        if let Some(wait) = wait {
            let value = match self.config.retry_after {
                RetryAfterMode::None => None,
                RetryAfterMode::Seconds => {
                    // Rounded up in integers: an `f64` drops the nanoseconds of a wait past
                    // 2^53 ns, naming a second too few.
                    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                    Some(secs.max(1).to_string())
                }
                RetryAfterMode::Date => {
                    // HTTP-dates have 1 s resolution: round the resume time up so a client that
                    // obeys it is never early.
                    let resume = self.clock.wall(now) + wait;
                    let since = resume
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or(Duration::ZERO);
                    let mut secs = since.as_secs();
                    if since.subsec_nanos() > 0 {
                        secs += 1;
                    }
                    let at = std::time::UNIX_EPOCH + Duration::from_secs(secs);
                    Some(httpdate::fmt_http_date(at))
                }
            };
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }

    /// Lets a request of `account` in: notes when it was seen and, in open mode, keeps the
    /// accounts within [`MockConfig::max_open_accounts`] by forgetting the least recently seen
    /// idle one for a new account. `Err`: every account is busy, the new one is refused.
    pub(crate) fn admit(&mut self, account: &str, now: Instant) -> Result<(), ()> {
        if !self.accounts.contains_key(account)
            && self.config.is_open()
            && self.accounts.len() >= self.config.max_open_accounts
        {
            let (tasks, accounts) = (&self.tasks, &self.accounts);
            let idle = self
                .seen
                .iter()
                .find(|(_, id)| accounts.get(*id).is_none_or(|a| a.is_idle(tasks, now)))
                .map(|(&seen, id)| (seen, id.clone()));
            let Some((seen, idle)) = idle else {
                return Err(());
            };
            // Its ended tasks are counted finished before it goes.
            self.settle(&idle, now);
            self.accounts.remove(&idle);
            self.seen.remove(&seen);
        }
        self.account(account);
        self.admitted += 1;
        if let Some(acct) = self.accounts.get_mut(account) {
            self.seen.remove(&acct.last_seen);
            acct.last_seen = self.admitted;
            self.seen.insert(self.admitted, account.to_owned());
        }
        Ok(())
    }

    /// Sets `account`'s own switches for `POST /__mock/switches` without holding more accounts
    /// than requests can: a name no request could be (keyed mode, no configured key of it) is
    /// refused; all off for an account the mock does not hold changes nothing and makes none;
    /// in open mode a new one is let in as a request's is ([`State::admit`]), so at most
    /// [`MockConfig::max_open_accounts`].
    pub(crate) fn set_switches_of(
        &mut self,
        account: &str,
        switches: Switches,
        now: Instant,
    ) -> Result<(), SwitchesRefused> {
        if let Some(acct) = self.accounts.get_mut(account) {
            acct.switches = switches;
            return Ok(());
        }
        if switches == Switches::default() {
            return Ok(());
        }
        if self.config.is_open() {
            self.admit(account, now)
                .map_err(|()| SwitchesRefused::NoRoom)?;
        } else {
            let config = &self.config;
            let configured = config.api_keys.iter().any(|k| k.account == account)
                || (config.access_key.is_some() && config.default_account() == account);
            if !configured {
                return Err(SwitchesRefused::UnknownAccount);
            }
        }
        self.account(account).switches = switches;
        Ok(())
    }

    /// The account's state, made (and numbered as just seen) when it has none.
    pub(crate) fn account(&mut self, id: &str) -> &mut Account {
        let seen = if self.accounts.contains_key(id) {
            0
        } else {
            self.admitted += 1;
            self.seen.insert(self.admitted, id.to_owned());
            self.admitted
        };
        self.accounts
            .entry(id.to_owned())
            .or_insert_with(|| Account {
                last_seen: seen,
                ..Account::default()
            })
    }

    /// Moves ended tasks out of the active set: counts them finished and refunds failures
    /// (those created in the current credit period; an older period's counts are gone).
    pub(crate) fn settle(&mut self, account: &str, now: Instant) {
        let period = self.config.scaled_credit_period();
        let Some(acct) = self.accounts.get_mut(account) else {
            return;
        };
        acct.roll_credit_period(period, now);
        let period_start = acct.credit_period_start;
        let tasks = &self.tasks;
        let mut finished = 0;
        acct.active.retain(|i| {
            // Never missing: a task is settled before it is forgotten.
            let Some(t) = tasks.get(i) else {
                return false;
            };
            if now >= t.end {
                finished += 1;
                if t.fails && period_start.is_none_or(|start| t.created >= start) {
                    acct.refunded += u64::from(t.cost);
                }
                false
            } else {
                true
            }
        });
        acct.occupied.retain(|o| o.until > now);
        self.stats.tasks_finished += finished;
    }

    pub(crate) fn settle_all(&mut self, now: Instant) {
        let ids: Vec<String> = self.accounts.keys().cloned().collect();
        for id in ids {
            self.settle(&id, now);
        }
    }

    /// Slots of `pool` held by `account` now (call [`State::settle`] first).
    pub(crate) fn in_use(&self, account: &str, pool: &str) -> u32 {
        let Some(acct) = self.accounts.get(account) else {
            return 0;
        };
        let tasks: u32 = acct
            .active
            .iter()
            .filter_map(|i| self.tasks.get(i))
            .filter(|t| t.pool == pool)
            .map(|t| t.weight)
            .fold(0, u32::saturating_add);
        let occupied: u32 = acct
            .occupied
            .iter()
            .filter(|o| o.pool == pool)
            .map(|o| o.slots)
            .fold(0, u32::saturating_add);
        tasks.saturating_add(occupied)
    }

    /// How long until `need` more slots of `pool` are free, if that ever happens.
    pub(crate) fn slot_wait(
        &self,
        account: &str,
        pool: &str,
        need: u32,
        now: Instant,
    ) -> Option<Duration> {
        let capacity = self.config.capacity(pool);
        if need > capacity {
            return None;
        }
        let acct = self.accounts.get(account)?;
        let mut holds: Vec<(Instant, u32)> = acct
            .active
            .iter()
            .filter_map(|i| self.tasks.get(i))
            .filter(|t| t.pool == pool)
            .map(|t| (t.end, t.weight))
            .chain(
                acct.occupied
                    .iter()
                    .filter(|o| o.pool == pool)
                    .map(|o| (o.until, o.slots)),
            )
            .collect();
        holds.sort_by_key(|h| h.0);
        let mut used = self.in_use(account, pool);
        for (end, weight) in holds {
            used = used.saturating_sub(weight);
            if used.saturating_add(need) <= capacity {
                return Some(end.saturating_duration_since(now));
            }
        }
        None
    }

    /// The key `pool` is counted under in the stats maps: its own name when it is a product's
    /// pool, configured, already named or there is room ([`MAX_STATS_POOLS`]), else
    /// `{pack}:*`. A model name comes from the client; the maps outlive its tasks.
    pub(crate) fn stats_pool(&self, pool: &str) -> String {
        let Some((pack, model)) = pool.split_once(':') else {
            return pool.to_owned();
        };
        let named = self.stats.max_concurrent.contains_key(pool)
            || self.stats.max_concurrent.len() < MAX_STATS_POOLS
            || self.config.pool_slots.contains_key(pool)
            || self
                .config
                .known_models
                .as_ref()
                .is_some_and(|known| known.iter().any(|m| m == model));
        if named {
            pool.to_owned()
        } else {
            format!("{pack}:*")
        }
    }

    /// Records a new high-water mark of slots for `pool` (under [`State::stats_pool`]).
    pub(crate) fn note_usage(&mut self, account: &str, pool: &str) {
        let used = self.in_use(account, pool);
        let key = self.stats_pool(pool);
        let max = self.stats.max_concurrent.entry(key).or_default();
        *max = (*max).max(used);
    }

    /// Holds slots as another tenant of the account would.
    pub(crate) fn occupy(
        &mut self,
        account: &str,
        pool: &str,
        slots: u32,
        until: Instant,
        now: Instant,
    ) {
        self.settle(account, now);
        self.account(account).occupied.push(Occupation {
            pool: pool.to_owned(),
            slots,
            until,
        });
        self.note_usage(account, pool);
    }

    /// Credits left to the account (`None` = unlimited; call [`State::settle`] first).
    pub(crate) fn remaining(&self, account: &str) -> Option<f64> {
        let budget = self.config.credits?;
        Some(budget - self.net_charged(account) as f64)
    }

    /// Credits charged minus refunds (call [`State::settle`] first).
    pub(crate) fn net_charged(&self, account: &str) -> u64 {
        self.accounts
            .get(account)
            .map_or(0, |a| a.charged.saturating_sub(a.refunded))
    }

    /// Starts the account's credit period at its first create (a no-op without a period or
    /// once started), then rolls it forward if it has ended.
    pub(crate) fn start_credit_period(&mut self, account: &str, now: Instant) {
        let period = self.config.scaled_credit_period();
        let acct = self.account(account);
        if period.is_some() && acct.credit_period_start.is_none() {
            acct.credit_period_start = Some(now);
        }
        acct.roll_credit_period(period, now);
    }

    /// The start and end of the account's current credit period, when it has one.
    pub(crate) fn credit_period(&self, account: &str) -> Option<(Instant, Instant)> {
        let period = self.config.scaled_credit_period()?;
        let start = self.accounts.get(account)?.credit_period_start?;
        Some((start, start + period))
    }

    /// When the first 1102 of the account's current credit period was answered (rolling the
    /// period first): while it is set, every create gets 1102.
    pub(crate) fn first_1102(&mut self, account: &str, now: Instant) -> Option<Instant> {
        self.in_its_period(account, now)?.first_1102
    }

    /// When the client was first sent an 1102 of the account's current credit period that it
    /// could read (rolling the period first, so a new period's creates are not counted as after
    /// an 1102). Later than [`State::first_1102`] when that one was late, and unset while every
    /// 1102 was lost, garbled or still on its way.
    pub(crate) fn seen_1102(&mut self, account: &str, now: Instant) -> Option<Instant> {
        self.in_its_period(account, now)?.seen_1102
    }

    /// A known account with its credit period rolled forward to `now` (its latches lifted if
    /// the period has ended); `None` for an account never seen or forgotten.
    fn in_its_period(&mut self, account: &str, now: Instant) -> Option<&mut Account> {
        let period = self.config.scaled_credit_period();
        let acct = self.accounts.get_mut(account)?;
        acct.roll_credit_period(period, now);
        Some(acct)
    }

    /// Latches 1102 for the rest of the credit period.
    pub(crate) fn latch_1102(&mut self, account: &str, now: Instant) {
        self.account(account).first_1102 = Some(now);
    }

    /// The 1102 answer to a create of `account` (the latch set already). Sent as it is built,
    /// the client sees it now; held ([`State::holding_answer`]), it is not seen yet, and its
    /// account is kept in [`State::held_1102`] for a slow answer to be seen when it is sent.
    pub(crate) fn refuse_1102(&mut self, account: &str, now: Instant) -> Response<Full<Bytes>> {
        if self.holding_answer {
            self.held_1102 = Some((account.to_owned(), now));
        } else {
            let acct = self.account(account);
            acct.seen_1102.get_or_insert(now);
        }
        self.error(1102, "resource pack exhausted", now, None)
    }

    /// A slow 1102 answer, built at `built`, sent to the client now: seen from now, unless the
    /// credit period it was built in has ended (the new one has no latch of its own from it)
    /// or the account has been forgotten.
    pub(crate) fn saw_late_1102(&mut self, account: &str, built: Instant, now: Instant) {
        let Some(acct) = self.in_its_period(account, now) else {
            return;
        };
        if acct.first_1102.is_some_and(|first| first <= built) {
            acct.seen_1102.get_or_insert(now);
        }
    }

    pub(crate) fn charge(&mut self, account: &str, cost: u32) {
        let acct = self.account(account);
        acct.charged = acct.charged.saturating_add(u64::from(cost));
    }

    /// Keeps a new task: numbered, running, listed, findable by its external id, and due to be
    /// forgotten [`TASK_RETENTION`] after it ends.
    pub(crate) fn add_task(&mut self, task: Task) {
        let seq = task.seq;
        self.last_seq = self.last_seq.max(seq);
        let retention = self.config.scaled(TASK_RETENTION).max(MIN_RETENTION);
        if let Some(at) = task.end.checked_add(retention) {
            self.expiry.push(Reverse((at, seq)));
        }
        let acct = self.account(&task.account);
        acct.active.push(seq);
        acct.tasks.insert(seq);
        if let Some(ext) = &task.external_id {
            let key = (external_scope(&task.generation).to_owned(), ext.clone());
            acct.external.insert(key, seq);
        }
        self.tasks.insert(seq, task);
    }

    /// The number the next task gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.last_seq + 1
    }

    /// Forgets every task that ended [`TASK_RETENTION`] (API time, [`MIN_RETENTION`] at least)
    /// or more ago: it leaves the task store, its account's list and its external id (free to
    /// be used again). The expiry queue hands over each task once, when its time comes, so a
    /// request pays only for the tasks it forgets.
    pub(crate) fn forget_expired(&mut self, now: Instant) {
        while let Some(&Reverse((at, seq))) = self.expiry.peek() {
            if at > now {
                return;
            }
            self.expiry.pop();
            let Some(account) = self.tasks.get(&seq).map(|t| t.account.clone()) else {
                continue;
            };
            // Counted finished (and refunded) first, as every ended task is.
            if self
                .accounts
                .get(&account)
                .is_some_and(|a| a.active.contains(&seq))
            {
                self.settle(&account, now);
            }
            let Some(task) = self.tasks.remove(&seq) else {
                continue;
            };
            // An account forgotten by open mode (and perhaps made again) may not list it.
            if let Some(acct) = self.accounts.get_mut(&account) {
                acct.tasks.remove(&seq);
                if let Some(ext) = task.external_id {
                    let key = (external_scope(&task.generation).to_owned(), ext);
                    if acct.external.get(&key) == Some(&seq) {
                        acct.external.remove(&key);
                    }
                }
            }
        }
    }

    /// The account's request-rate GCRA parameters (interval, tolerance, penalty), if it has a
    /// limit.
    fn account_limit(&self) -> Option<(Duration, Duration, bool)> {
        self.config.rate_limit.map(|limit| {
            let interval = self.config.scaled_secs(60.0 / limit.per_minute);
            let tolerance = interval
                .saturating_mul(limit.burst.saturating_sub(1))
                .min(MAX_WAIT);
            (interval, tolerance, limit.penalty)
        })
    }

    /// The interval of `/account/costs`' own limit, when the request is one (`costs`) and the
    /// limit is set.
    fn costs_interval(&self, costs: bool) -> Option<Duration> {
        self.config
            .costs_per_second
            .filter(|_| costs)
            .map(|per_second| self.config.scaled_secs(1.0 / per_second))
    }

    /// How long until [`State::rate_check`] would let a request of `account` in, touching no
    /// state: the lockout's time left, or the rate limits' own wait when longer (the penalty
    /// mode may have pushed it past the lockout's end). A refusal for another reason (the
    /// `throttled` switch) names it too, so a client that waits as told is not refused by the
    /// rate limit next.
    pub(crate) fn admission_wait(&self, account: &str, costs: bool, now: Instant) -> Duration {
        let Some(acct) = self.accounts.get(account) else {
            return Duration::ZERO;
        };
        let lockout_left = acct
            .locked_until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        let limits = [
            self.account_limit()
                .map(|(interval, tolerance, _)| (acct.tat, interval, tolerance)),
            self.costs_interval(costs)
                .map(|interval| (acct.costs_tat, interval, Duration::ZERO)),
        ];
        limits
            .into_iter()
            .flatten()
            .filter_map(|(tat, interval, tolerance)| {
                gcra(tat, interval, tolerance, false, now).err()
            })
            .fold(lockout_left, |wait, (w, _)| wait.max(w))
    }

    /// GCRA over every request of the account and, for `/account/costs` (`costs`), that
    /// endpoint's own limit. A request passes both or neither: one refused by either takes
    /// nothing from the other (the penalty mode still pushes the account limit on its own
    /// refusal). With [`MockConfig::rate_lockout`], such a refusal also refuses every request
    /// of the account until the lockout ends, and says so in its wait. `Err` carries the wait
    /// until the request would pass.
    pub(crate) fn rate_check(
        &mut self,
        account: &str,
        costs: bool,
        now: Instant,
    ) -> Result<(), Duration> {
        let account_limit = self.account_limit();
        let costs_interval = self.costs_interval(costs);
        let lockout = self.config.rate_lockout.map(|l| self.config.scaled(l));
        if self
            .accounts
            .get(account)
            .and_then(|acct| acct.locked_until)
            .is_some_and(|until| now < until)
        {
            // Fixed from the refusal that set it: a client cannot lengthen it by asking. The
            // wait names the rate limits' own too, when longer (a lockout under one interval),
            // without touching their state.
            return Err(self.admission_wait(account, costs, now));
        }
        let acct = self.account(account);
        let general = account_limit.map(|(interval, tolerance, penalty)| {
            gcra(acct.tat, interval, tolerance, penalty, now)
        });
        let class = costs_interval
            .map(|interval| gcra(acct.costs_tat, interval, Duration::ZERO, false, now));
        let mut wait = None;
        if let Some(Err((w, tat))) = general {
            acct.tat = Some(tat);
            wait = Some(w);
        }
        if let Some(Err((w, _))) = class {
            wait = Some(wait.map_or(w, |v: Duration| v.max(w)));
        }
        if let Some(wait) = wait {
            let Some(lockout) = lockout else {
                return Err(wait);
            };
            acct.locked_until = Some(now + lockout);
            return Err(wait.max(lockout));
        }
        if let Some(Ok(tat)) = general {
            acct.tat = Some(tat);
        }
        if let Some(Ok(tat)) = class {
            acct.costs_tat = Some(tat);
        }
        Ok(())
    }

    /// Whether `GET /__mock/files/{name}` finds a file: `{task_id}/{index}.{ext}` of a task
    /// that has succeeded, an index it produced, its extension, and less than
    /// [`OUTPUT_LIFETIME`] (API time) after the task ended, as Kling's output URLs expire, or
    /// [`MIN_RETENTION`] (real time) if longer: a task still kept never lists a dead URL.
    pub(crate) fn serves_file(&self, name: &str, now: Instant) -> bool {
        let Some((id, file)) = name.split_once('/') else {
            return false;
        };
        let Some((index, ext)) = file.split_once('.') else {
            return false;
        };
        let Some(task) = task_seq(id).and_then(|seq| self.tasks.get(&seq)) else {
            return false;
        };
        let expires = task.end + self.config.scaled(OUTPUT_LIFETIME).max(MIN_RETENTION);
        task.phase(now) == Phase::Succeeded
            && now < expires
            && ext == task.extension()
            && index
                .parse::<u32>()
                .is_ok_and(|i| i < task.outputs && i.to_string() == index)
    }

    /// The snapshot served by `/__mock/stats`.
    pub(crate) fn snapshot(&mut self, now: Instant) -> Stats {
        self.settle_all(now);
        let mut in_use: std::collections::BTreeMap<String, u32> = Default::default();
        // Under the keys `max_concurrent` gave them (every pool in use was noted there).
        let key = |pool: &str| self.stats_pool(pool);
        for acct in self.accounts.values() {
            for t in acct.active.iter().filter_map(|i| self.tasks.get(i)) {
                let e = in_use.entry(key(&t.pool)).or_default();
                *e = e.saturating_add(t.weight);
            }
            for o in &acct.occupied {
                let e = in_use.entry(key(&o.pool)).or_default();
                *e = e.saturating_add(o.slots);
            }
        }
        let mut stats = self.stats.clone();
        stats.in_use = in_use;
        stats
    }

    /// Zeroes the counters; high-water marks restart from the slots held now.
    pub(crate) fn reset_stats(&mut self, now: Instant) {
        self.settle_all(now);
        self.stats = Stats::default();
        let pairs: Vec<(String, String)> = self
            .accounts
            .iter()
            .flat_map(|(id, a)| {
                a.active
                    .iter()
                    .filter_map(|i| self.tasks.get(i))
                    .map(|t| t.pool.clone())
                    .chain(a.occupied.iter().map(|o| o.pool.clone()))
                    .map(move |p| (id.clone(), p))
            })
            .collect();
        for (account, pool) in pairs {
            self.note_usage(&account, &pool);
        }
    }
}
