//! [`RedisGcra`]: the rate limiter's [`Backend`] in Redis, one Lua script per decision.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use kling_core::AccountId;
use kling_ratelimit::backend::{FleetRequests, Reported};
use kling_ratelimit::error::BackendError;
use kling_ratelimit::{
    Backend, BucketKey, Decision, Feedback, InProcess, Policy, RETRY_AFTER_RESOLUTION,
};
use redis::Script;
use tokio::time::Instant;

use crate::conn::{Connection, MAX_DURATION, micros, segment};
use crate::error::{ConfigError, StoreError};
use crate::order_lua::QUEUE;
use crate::slots::instance_id;
use crate::unreachable::{DEFAULT_RETRY_EVERY, WhenUnreachable};

/// How long a key without traffic keeps its state (cooldown streak, adaptive rate) by default.
pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(600);
/// How long a waiting process's place in a key's queue lasts past the instant it was told to
/// ask again, by default. A waiting process asks again at that instant, so its next ask is due
/// within a round trip; the place ending soon after bounds what a process that stops asking
/// without leaving (it crashed, or lost Redis) costs the fleet. A process whose waiting
/// requests all gave up leaves at once ([`Backend::stop_waiting`]).
pub const DEFAULT_GCRA_PLACE_TTL: Duration = Duration::from_millis(500);

/// The most pauses a process keeps one by one for delivery while Redis cannot take them; past
/// it a key's reports are merged into one (the latest end, a 1302 if any was one) rather than
/// dropped, so the queue then holds one report per key.
const MAX_UNDELIVERED: usize = 1024;

/// The most keys a process remembers at their adaptive ceiling ([`Inner::saw_ceiling`]).
const MAX_AT_CEILING: usize = 4096;

/// Options of [`RedisGcra`], applied with its builder methods.
#[derive(Clone, Copy, Debug)]
struct Options {
    when_unreachable: WhenUnreachable,
    retry_every: Duration,
    idle_ttl: Duration,
    arrival_order: bool,
    place_ttl: Duration,
    usage_window: Duration,
    count_requests: bool,
}

/// What both acquire scripts share: `gcra`, one key's GCRA decision, and `count`, the count of
/// an account-wide key's admitted requests. Times are integer microseconds of fleet time;
/// numbers written back go through `%.0f` (Lua's `tostring` keeps only 14 digits) and `%.17g`
/// for rates. ARGV (both scripts): 1 now, 7 idle TTL (µs), 8 the asking process's place ('' =
/// it takes none), 9 since when the asking request has waited (µs), 10 how long a place
/// outlives the instant its process was told to ask again (µs), 11 the usage bucket (µs).
///
/// `gcra(key, q, qx, period, burst, adaptive, start, ceiling, rec, target, probe)`: `key` the
/// key's hash, `q` its fleet queue (sorted set: waiting process → since when its asking request
/// has waited, µs), `qx` when each place ends (µs); the key's quota: period (µs, rounded up),
/// burst, adaptive ('1'), adaptive start rate (-1: ceiling/4; clamped to ceiling/1000..ceiling,
/// as [`AdaptiveState::new`](kling_ratelimit::AdaptiveState::new) does), ceiling rate; `rec`
/// the asking process's record (below); the adaptive target and probe (`nil`: a caution held
/// reads as not at the ceiling). Returns a function that takes the cell and returns whether
/// the key's 1302 streak is running and whether its adaptive rate is at the ceiling with
/// nothing a success would change, or `nil` and the refusal `{1, not_before, cooldown 0/1}`:
/// nothing is taken until that function is called, so a script may ask another key first.
/// The first decision after a pause (`cd`, then cleared) ends it with the key's burst spent,
/// as in process: `tat` at least `cd + period × (burst − 1)` at the pace applied before, so
/// the requests queued behind it go an interval apart (kept whether the decision then admits
/// or refuses).
///
/// The fleet's order: each process sends only its queue's head, with the instant that request
/// began waiting; a refused head holds its process's place, scored by that instant, and a cell
/// goes only to the head that has waited longest (or to a request that holds no place and
/// waited longer than every place). Each process queues in arrival order too, so the fleet's
/// requests are served in the order they began waiting, and no process is starved by one that
/// is nearer to Redis and always asks first. Admitted, a head leaves its process's place.
///
/// `count(n)`: counts an admitted request in `n`, an account-wide key's hash of time buckets
/// (bucket → count, [`USAGE_BUCKETS`] of them in a window), read by
/// [`RedisGcra::fleet_requests`].
const GCRA_FN: &str = r"
local now = tonumber(ARGV[1])
local idle = tonumber(ARGV[7])
local me = ARGV[8]
local since = ARGV[9]
local place_ttl = tonumber(ARGV[10])
local function int(x) return string.format('%.0f', x) end
-- The record of one process's admitted asks of a key, in its hash: `a:PROCESS` the number
-- `lo`, `m:PROCESS` a mask whose bit k is set when the process's ask `lo + k` was admitted,
-- `w:PROCESS` when it was last written (µs); asks are numbered per key by their process.
-- Numbers go to Redis as they are (it writes them in full), not formatted here.
local function rec_bit(mask, k) return math.floor(mask / 2 ^ k) % 2 == 1 end
local function rec_read(l, m, floor)
  l, m = tonumber(l), tonumber(m)
  -- (One from before the process numbered afresh, `l` past `floor`, is dropped.)
  if not (l and m and l <= floor and floor - l < 53) then return floor, 0 end
  return floor, math.floor(m / 2 ^ (floor - l))
end
local function rec_admit(lo, mask, n)
  local k = n - lo
  if k < 0 then return lo, mask end
  if k > 51 then
    -- Past the window: its oldest asks are forgotten.
    local shift = k - 51
    if shift < 53 then mask = math.floor(mask / 2 ^ shift) else mask = 0 end
    lo, k = lo + shift, 51
  end
  if not rec_bit(mask, k) then mask = mask + 2 ^ k end
  return lo, mask
end
-- A process's first record in a key's hash drops those of processes that wrote none for the
-- idle TTL (gone, or with nothing to replay): a busy key's hash keeps no record for good.
local function rec_tidy(key)
  if redis.call('HLEN', key) <= 32 then return end
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 2) == 'w:' and tonumber(flat[i + 1]) < now - idle then
      local process = string.sub(flat[i], 3)
      redis.call('HDEL', key, 'a:' .. process, 'm:' .. process, flat[i])
    end
  end
end
local function gcra(key, q, qx, period, burst, adaptive, start, ceiling, rec, target, probe)
  -- The end of the place of the process ahead of this one, if one is. (No queue, the usual
  -- case when nobody waits: one lookup.)
  local ahead_until = nil
  local queued = redis.call('EXISTS', qx) == 1
  if queued then ahead_until = ahead_of(q, qx, me, tonumber(since), now) end
  local v = redis.call('HMGET', key, 't', 'p', 'cd', 'r', 'se', rec and rec.a or 'a:',
    rec and rec.m or 'm:', 'l', 'k')
  -- Whether this call wrote the hash: a write may create it, and every hash gets an expiry.
  local wrote = false
  -- Whether a 1302 streak runs (a success would reset it), and whether the key's adaptive
  -- `rate` is at its ceiling with nothing a success would change, as kling-ratelimit's
  -- in-process backend asks `AdaptiveState::on_success`: the rule caps the grown rate at the
  -- ceiling; no 1302 came since the last success (`se`, which a success deletes with the
  -- streak and the lowerings it ends); and no caution (`k`) is held that the success would
  -- end, its step reaching the limit (`l`: a ceiling lowered near it). A rate above a ceiling
  -- lowered since is capped at it (further down), as in process.
  local function running()
    local se = tonumber(v[5])
    return se ~= nil and se >= now
  end
  local function at_ceiling(rate)
    if adaptive ~= '1' or rate == nil or rate ~= tonumber(ceiling) or v[5] then return false end
    local caution = tonumber(v[9])
    if not caution then return true end
    local limit, t, pr = tonumber(v[8]), tonumber(target), tonumber(probe)
    if not (limit and t and pr) then return false end
    return rate + math.max((t * limit - rate) / 4, pr * limit / caution) < limit
  end
  -- The hash lives the idle TTL past the latest of `last`, the key's pace and its streak
  -- window.
  local function expire(last)
    local se = tonumber(v[5])
    if se and se > last then last = se end
    redis.call('PEXPIRE', key, math.ceil((last - now + idle) / 1000))
  end
  local function wait(at, cooldown, tat)
    if wrote then expire(math.max(tat or now, now)) end
    if me ~= '' then take_place(q, qx, me, since, math.max(at, now) + place_ttl, now) end
    return nil, {1, at, cooldown}
  end
  local cd = tonumber(v[3])
  if cd and cd > now then
    return wait(cd, 1)
  end
  -- An ask of this process whose answer was lost after this key admitted it: the cell it
  -- took goes to this ask (moved to this ask's number, should its answer be lost too), and
  -- none is taken. Looked at once the key is not paused: a cell taken before a pause is not
  -- sent during it.
  if rec and #rec.lost > 0 then
    rec.checked = true
    local lo, mask = rec_read(v[6], v[7], rec.floor)
    for _, m in ipairs(rec.lost) do
      if m >= lo and m - lo < 52 and rec_bit(mask, m - lo) then
        mask = mask - 2 ^ (m - lo)
        lo, mask = rec_admit(lo, mask, rec.n)
        return function()
          if queued and me ~= '' then leave_place(q, qx, me) end
          redis.call('HSET', key, rec.a, lo, rec.m, mask, rec.w, now)
          return running(), at_ceiling(tonumber(v[4]))
        end, nil, m
      end
    end
  end
  local rate = nil
  if adaptive == '1' then
    local ceil = tonumber(ceiling)
    rate = tonumber(v[4])
    if not rate then
      rate = tonumber(start)
      if rate < 0 then rate = ceil / 4 end
      if rate > ceil then rate = ceil end
      if rate < ceil / 1000 then rate = ceil / 1000 end
      redis.call('HSET', key, 'r', string.format('%.17g', rate))
      wrote = true
    end
    if rate > ceil then
      -- The ceiling was lowered since (a quota change): the rate held is capped at it, as in
      -- process, so the key is at its ceiling and a 1302 lowers the rate from it.
      rate = ceil
      redis.call('HSET', key, 'r', string.format('%.17g', rate))
      wrote = true
    end
    local p = math.ceil(1e6 / rate)
    if p > period then period = p end
  end
  local tat = tonumber(v[1])
  local applied = tonumber(v[2])
  if cd then
    -- The pause is over: the key starts with its burst spent (one request at its end, the next
    -- an interval apart), at the pace it was applied at; a quota change since then applies
    -- below. Once: the pause is forgotten with it.
    local at = applied or period
    local spent = cd + at * (burst - 1)
    if (not tat) or spent > tat then
      tat = spent
      redis.call('HSET', key, 't', int(tat), 'p', int(at))
    end
    applied = at
    redis.call('HDEL', key, 'cd')
    wrote = true
  end
  if tat and applied and applied ~= period then
    if tat > now then
      tat = now + math.ceil((tat - now) * period / applied)
    end
    redis.call('HSET', key, 't', int(tat), 'p', int(period))
    wrote = true
  end
  if not tat then tat = now end
  local earliest = tat - period * (burst - 1)
  if ahead_until then
    -- The cell goes to the process ahead: ask for the one after it, or when its place ends.
    return wait(math.min(math.max(earliest, now) + period, ahead_until), 0, tat)
  end
  if now < earliest then
    return wait(earliest, 0, tat)
  end
  return function()
    if queued and me ~= '' then leave_place(q, qx, me) end
    local nxt = math.max(tat, now) + period
    if rec then
      if not v[6] then rec_tidy(key) end
      local lo, mask = rec_read(v[6], v[7], rec.floor)
      lo, mask = rec_admit(lo, mask, rec.n)
      redis.call('HSET', key, 't', int(nxt), 'p', int(period), rec.a, lo, rec.m, mask,
        rec.w, now)
    else
      redis.call('HSET', key, 't', int(nxt), 'p', int(period))
    end
    expire(nxt)
    return running(), at_ceiling(rate)
  end
end
local function count(n)
  local bucket = tonumber(ARGV[11])
  local at = math.floor(now / bucket)
  -- The bucket's first request (the usual request adds to its bucket and nothing more) keeps
  -- the hash alive two windows, and drops the buckets past the window once they are a few
  -- more than it holds: a bounded hash.
  if redis.call('HINCRBY', n, int(at), 1) == 1 then
    if redis.call('HLEN', n) > USAGE_BUCKETS + 8 then
      for _, field in ipairs(redis.call('HKEYS', n)) do
        if tonumber(field) <= at - USAGE_BUCKETS then redis.call('HDEL', n, field) end
      end
    end
    redis.call('PEXPIRE', n, math.ceil(2 * USAGE_BUCKETS * bucket / 1000))
  end
end
";

/// One GCRA decision ([`GCRA_FN`]'s `gcra`). `KEYS[1]` the key's hash, `KEYS[2]` and `KEYS[3]`
/// its fleet queue. ARGV: as `GCRA_FN`'s, and 2 period (µs, rounded up), 3 burst, 4 adaptive
/// (0/1), 5 adaptive start rate (-1: ceiling/4), 6 ceiling rate; 12 the asking process ('':
/// no record), 13 the ask's number, 14 the lowest number of the process's asks of the key
/// whose answer it has not heard, 15 those whose answer was lost (comma-separated), 16 and 17
/// the adaptive target and probe (`Adaptive::target`, `Adaptive::probe`; '' for a fixed quota).
/// Returns {0, streak, replayed, at_ceiling} (admit; streak 1 while the key's 1302 streak is
/// running, so the process reports its successes and one of them resets it; `replayed` the
/// lost ask whose cell it was given, else -1 when the lost ones were looked at and none was
/// admitted, -2 when they were not; `at_ceiling` 1 when the key's adaptive rate is at its
/// ceiling with nothing a success would change, so its successes need no report:
/// [`Backend::adaptive_at_ceiling`]) or {1, not_before, cooldown 0/1, looked at 0/1}.
///
/// The process's admitted asks are recorded in the key's hash (`a:`, `m:`, `w:PROCESS`, see
/// [`Inner::decide`]), so that one whose answer was lost (a timeout after the key admitted it)
/// is not paid for again: the process's next ask gets its cell, and is not counted.
///
/// `KEYS[4]`, for an account-wide key only, counts the admitted requests by time bucket
/// (`count`).
const ACQUIRE_BODY: &str = r"
local rec = nil
if ARGV[12] ~= '' then
  rec = {a = 'a:' .. ARGV[12], m = 'm:' .. ARGV[12], w = 'w:' .. ARGV[12],
    n = tonumber(ARGV[13]), floor = tonumber(ARGV[14]), lost = {}, checked = false}
  for m in string.gmatch(ARGV[15], '%d+') do rec.lost[#rec.lost + 1] = tonumber(m) end
end
local take, refusal, replayed = gcra(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[2]),
  tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], rec, ARGV[16], ARGV[17])
local checked = rec ~= nil and rec.checked
if not take then
  refusal[4] = checked and 1 or 0
  return refusal
end
local streak, top = take()
if KEYS[4] and not replayed then count(KEYS[4]) end
if not replayed then replayed = checked and -1 or -2 end
return {0, streak and 1 or 0, replayed, top and 1 or 0}
";

/// Reject mode's decision of a class request ([`Backend::acquire_class_or_refuse`]): its
/// class key's turn and its account key's, both or neither. `KEYS[1..3]` the class key's hash
/// and fleet queue, `KEYS[4..6]` the account key's, `KEYS[7]` (optional) the account key's
/// count of admitted requests. ARGV: as [`ACQUIRE_BODY`]'s for the class key (it takes no
/// place: 8 is ''), then 12 to 16 the account key's quota (as 2 to 6), 17 and 18 its adaptive
/// target and probe.
/// Returns {0, streak, at_ceiling} (both turns taken; the account key's streak, and whether
/// its adaptive rate is at the ceiling with nothing a success would change) or {1,
/// not_before, cooldown 0/1, which}: the class key's refusal (`which` 0; the account is not
/// asked), or the account key's (1; the class key's turn is not taken).
const ACQUIRE_CLASS_BODY: &str = r"
local take_class, refusal = gcra(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[2]),
  tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6])
if not take_class then
  refusal[4] = 0
  return refusal
end
local take_account, refused = gcra(KEYS[4], KEYS[5], KEYS[6], tonumber(ARGV[12]),
  tonumber(ARGV[13]), ARGV[14], ARGV[15], ARGV[16], nil, ARGV[17], ARGV[18])
if not take_account then
  refused[4] = 1
  return refused
end
take_class()
local streak, top = take_account()
if KEYS[7] then count(KEYS[7]) end
return {0, streak and 1 or 0, top and 1 or 0}
";

/// The requests an account-wide key admitted over the last window. `KEYS[1]` the count hash;
/// ARGV: now (µs), bucket (µs). Returns the sum of the last [`USAGE_BUCKETS`] buckets.
const USAGE_BODY: &str = r"
local at = math.floor(tonumber(ARGV[1]) / tonumber(ARGV[2]))
local flat = redis.call('HGETALL', KEYS[1])
local sum = 0
for i = 1, #flat, 2 do
  if tonumber(flat[i]) > at - USAGE_BUCKETS then sum = sum + tonumber(flat[i + 1]) end
end
return sum
";

/// The buckets of a usage window ([`RedisGcra::usage_window`]): counts move out of the
/// window a sixtieth of it at a time.
pub const USAGE_BUCKETS: u32 = 60;

/// The window [`RedisGcra::fleet_requests`] counts over by default: the minute Kling's
/// request quotas are set per.
pub const DEFAULT_USAGE_WINDOW: Duration = Duration::from_secs(60);

/// The asking process gives its place in a key's queue up: no request of it waits for the key
/// any more. `KEYS[1]` the queue, `KEYS[2]` when each place ends; `ARGV[1]` the process's place.
/// Returns 1 if it held one.
const LEAVE_BODY: &str = r"
if leave_place(KEYS[1], KEYS[2], ARGV[1]) then return 1 end
return 0
";

/// What a response said. `KEYS[1]` the key's hash. ARGV: now, kind (s/p), sent_at, received_at,
/// resume_at ('' for none), throttled (0/1), configured period, adaptive (0/1), start rate,
/// ceiling, growth, decrease, target, probe, cooldown first, escalate_after, backoff, ceiling,
/// window, idle TTL, the `Retry-After`'s wait less its resolution in seconds ('' for none),
/// max caution. Returns {cooldown_until or -1, streak, at_ceiling}: `at_ceiling` 1 when
/// the key's adaptive rate is at its ceiling after the report, with nothing a success would
/// change (no 1302 since the last success, no caution a success would end).
///
/// The adaptive rate follows [`AdaptiveState`](kling_ratelimit::AdaptiveState)'s rule: `r`
/// the rate, `l` the remembered limit, `nl` the lowerings since the last success; a counted
/// 1302 lowers the rate unless it is past the cooldown's `escalate_after` in its streak (it
/// came after a burst-backoff pause) or `escalate_after` lowerings came since the last success;
/// `k` the caution, which a lowering sets to what its `Retry-After` cost in intervals (absent:
/// 1) and which divides the probe step until a success takes the rate to the limit.
///
/// A 1302 adds to the key's streak when it comes within the window of the end of the pause the
/// streak's last 1302 set (`se` holds that end plus the window), as in process.
///
/// A pause (which is kept for delivery when Redis does not take it) also gives `KEYS[2]`, the
/// numbers of this process's pauses that the key took (a sorted set, expiring when this script
/// leaves the key's hash to expire), `ARGV[23]` its number and `ARGV[24]` the lowest number
/// the process may still send (those below are dropped from the set). One whose number was
/// taken already (its first attempt, or a delivery, whose answer was lost: cut short, or
/// timed out) is not applied again, which would count its 1302 twice in the streak. A set,
/// not the last number: a process's reports are sent concurrently, and may land out of order.
const FEEDBACK: &str = r"
local key = KEYS[1]
local now = tonumber(ARGV[1])
local v = redis.call('HMGET', key, 's', 'lp', 'se', 'cd', 'r', 'l', 'p', 't', 'nl', 'k')
local streak = tonumber(v[1]) or 0
-- Every counted 1302 sets `se` and only a success deletes it: without it, no lowering came
-- since the last success, whatever `nl` says (a script of the version before `nl` deletes
-- `se` alone at a success, in a fleet upgraded one process at a time).
local lowerings = 0
if v[3] then lowerings = tonumber(v[9]) or 0 end
local lp = tonumber(v[2])
local se = tonumber(v[3])
local cd = tonumber(v[4])
local rate = tonumber(v[5])
local limit = tonumber(v[6])
-- The caution held (`k`), as this script leaves it.
local held = tonumber(v[10])
local adaptive = ARGV[8] == '1'
local ceiling = tonumber(ARGV[10])
local function clamp(x)
  if x < ceiling / 1000 then x = ceiling / 1000 end
  if x > ceiling then x = ceiling end
  return x
end
local function start_rate()
  local r = tonumber(ARGV[9])
  if r < 0 then r = ceiling / 4 end
  return clamp(r)
end
local function int(x) return string.format('%.0f', x) end
-- 1 when the key's adaptive rate is at its ceiling with nothing a success would change (as
-- `gcra`'s `at_ceiling` in the acquire scripts: no 1302 since the last success, no caution the
-- success would end): the process then reports no success (`Backend::adaptive_at_ceiling`).
-- At it, not above: a rate above a ceiling lowered since (no decision under it yet, which caps
-- it) is brought down to it by a success.
local function top()
  if not (adaptive and rate and rate == ceiling) or se then return 0 end
  if held then
    if not limit then return 0 end
    local step = math.max((tonumber(ARGV[13]) * limit - rate) / 4,
      tonumber(ARGV[14]) * limit / held)
    if rate + step >= limit then return 0 end
  end
  return 1
end
local function expire()
  -- The latest of the key's pace, its pause and its streak window, any of which may be absent
  -- (a list holding nils would end at the first: no ipairs).
  local last = now
  local t = tonumber(v[8])
  if t and t > last then last = t end
  if cd and cd > last then last = cd end
  if se and se > last then last = se end
  local ms = math.ceil((last - now + tonumber(ARGV[20])) / 1000)
  redis.call('PEXPIRE', key, ms)
  if KEYS[2] then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[24])
    redis.call('ZADD', KEYS[2], ARGV[23], ARGV[23])
    redis.call('PEXPIRE', KEYS[2], ms)
  end
end
if KEYS[2] and redis.call('ZSCORE', KEYS[2], ARGV[23]) then
  -- Taken already: what the key holds now.
  if cd and cd > now then return {cd, streak, top()} end
  return {-1, streak, top()}
end
if ARGV[2] == 's' then
  -- A success of a request sent before the last pause began says nothing about the rate since
  -- (as a 1302 sent then does not escalate the pause): streak and rate are left alone.
  local sent_s = tonumber(ARGV[3])
  if lp and sent_s and sent_s < lp then
    expire()
    return {-1, streak, top()}
  end
  redis.call('HSET', key, 's', 0)
  redis.call('HDEL', key, 'se', 'nl')
  se = nil
  if adaptive and rate then
    if limit then
      local caution = tonumber(v[10]) or 1
      local target = tonumber(ARGV[13]) * limit
      local probe = tonumber(ARGV[14]) * limit / caution
      rate = rate + math.max((target - rate) / 4, probe)
      -- Past where the costly refusal came: a raised limit is found at the usual pace.
      if rate >= limit and held then
        redis.call('HDEL', key, 'k')
        held = nil
      end
    else
      rate = rate * (1 + tonumber(ARGV[11]))
    end
    rate = clamp(rate)
    redis.call('HSET', key, 'r', string.format('%.17g', rate))
  end
  expire()
  return {-1, 0, top()}
end
local sent = tonumber(ARGV[3])
local recv = tonumber(ARGV[4])
local resume = tonumber(ARGV[5])
local throttled = ARGV[6] == '1'
local counted = throttled and ((not lp) or sent >= lp)
if counted then
  -- Within the window of the end of the pause the streak's last 1302 set (`se` is that end
  -- plus the window), not of its arrival: a pause as long as the window (the default ceiling
  -- is) must not end the streak it escalates.
  if streak > 0 and se and recv <= se then
    streak = streak + 1
  else
    streak = 1
  end
  lp = recv
  redis.call('HSET', key, 's', streak, 'lp', int(lp))
  -- One past escalate_after came after a burst-backoff pause: the server refuses whatever the
  -- pace, so the rate and the limit stay; so do they after escalate_after lowerings with no
  -- success since (`nl`), in whatever streaks they came.
  local ea = tonumber(ARGV[16])
  if adaptive and streak <= ea and lowerings < ea then
    if not rate then rate = start_rate() end
    -- Refused at the rate enforced, which a ceiling lowered since (a quota change) caps: `r`
    -- may still be above it. Lowered from `r`, the rate was clamped back to that ceiling.
    rate = clamp(rate)
    limit = rate
    rate = clamp(rate * tonumber(ARGV[12]))
    redis.call('HSET', key, 'r', string.format('%.17g', rate), 'l', string.format('%.17g', limit),
      'nl', lowerings + 1)
    -- What the refusal cost in intervals of the refused rate, past the header's resolution
    -- (`Adaptive::caution`): the probe's divisor until the rate is back at the limit.
    -- Comparisons, not `math.max`: that keeps a NaN first argument (a `max_caution` no layer
    -- validated), which Rust's `f64::max` reads as the other, 1.
    local caution = 1
    local excess = tonumber(ARGV[21])
    if excess then
      local most = tonumber(ARGV[22])
      if not (most and most >= 1) then most = 1 end
      caution = excess * limit
      if not (caution >= 1) then caution = 1 end
      if caution > most then caution = most end
    end
    if caution ~= 1 then
      redis.call('HSET', key, 'k', string.format('%.17g', caution))
      held = caution
    elseif held then
      redis.call('HDEL', key, 'k')
      held = nil
    end
  end
end
local interval = tonumber(v[7]) or tonumber(ARGV[7])
local esc = nil
if throttled then
  local s = math.max(streak, 1)
  local ea = tonumber(ARGV[16])
  local pause
  if s < ea then
    pause = math.max(tonumber(ARGV[15]) * 2 ^ math.min(s - 1, 20), interval)
  else
    pause = tonumber(ARGV[17]) * 2 ^ math.min(s - ea, 20)
  end
  pause = math.min(pause, tonumber(ARGV[18]))
  esc = recv + pause
end
local untl = recv
if resume and esc then untl = math.max(resume, esc)
elseif resume then untl = resume
elseif esc then untl = esc end
if counted then
  -- The streak's window runs from the end of the pause this 1302 set.
  se = untl + tonumber(ARGV[19])
  redis.call('HSET', key, 'se', int(se))
end
local extends = untl > now and ((not cd) or untl > cd)
if extends then
  cd = untl
  redis.call('HSET', key, 'cd', int(cd))
end
expire()
if extends then return {untl, streak, top()} end
return {-1, streak, top()}
";

/// The rate limiter's state in Redis, shared by every process of a fleet: implements
/// [`kling_ratelimit::Backend`] for [`GcraLayer`](kling_ratelimit::GcraLayer).
///
/// - **One script per decision**: [`acquire`](Backend::acquire) is one atomic `EVALSHA`
///   (reloaded when Redis has forgotten the script), so two processes never both take the
///   last cell; the state is a hash per key, `PREFIX:gcra:ACCOUNT[:CLASS]`, expiring once idle.
/// - **Same answers as in process**: the script is governor's GCRA (`tat`, tolerance
///   `period × (burst − 1)`), the cooldown escalation of
///   [`Cooldown`](kling_ratelimit::Cooldown) and the AIMD rule of
///   [`Adaptive`](kling_ratelimit::Adaptive), so a fleet learns a 1302 and an adaptive rate
///   together: a pause ends with the key's burst spent (the requests queued behind it go an
///   interval apart), and a 1302 adds to the streak within the window of the end of the last
///   pause. The emission interval is rounded up to a whole microsecond.
/// - **Waiting stays in the process**: the layer's FIFO queue and tokio sleep; only a queue's
///   head asks Redis.
/// - **Fleet order**: a refused request holds its process's place in the key's queue in Redis,
///   scored by when it began waiting (the layer says, through
///   [`Backend::acquire_waiting`]), and the next cell goes to the request that has waited
///   longest in any process. Without it, the process nearest to Redis would win every cell it
///   asked for at the same instant as another, and could starve it. An admitted request leaves
///   its process's place, and a process whose waiting requests all gave up leaves it
///   ([`Backend::stop_waiting`]); a place also ends [`place_ttl`](Self::place_ttl) after the
///   instant its process was told to ask again, so a process that stops asking without leaving
///   (it crashed, or lost Redis) holds the fleet up for at most that long.
///   [`arrival_order(false)`](Self::arrival_order) serves whoever asks first.
/// - **Unreachable Redis**: see [`WhenUnreachable`]. A pause whose report Redis does not take
///   (away, timed out) is not lost, in any mode: this process holds it in its own decisions for
///   the key until it ends, and delivers the report, in order, when Redis answers again (before
///   its next decision or report there, and every [`retry_every`](Self::retry_every) in the
///   background), so the fleet pauses and counts the 1302 in its streak. With
///   [`WhenUnreachable::Fallback`], the fallback starts from the end of the fleet's pause of
///   the key that Redis last told this process of.
/// - **A pause outlives a Redis that loses it**: the end of a key's pause that Redis told
///   this process of (a refusal, a report's reply) holds in its decisions for the key until
///   then, without asking Redis, in every mode: Redis restarted empty, or failed over to a
///   replica that had not heard of the pause, would admit the whole fleet at once into the
///   server that just refused. A process that never heard of the pause is not held, and the
///   key's 1302 streak is not sent again (the next 1302 starts a new one). While no pause
///   heard of runs, this costs a decision one load and one comparison.
/// - **A lost answer is not paid for twice**: a decision whose answer is lost (a timeout, a
///   dropped connection, or its request dropped while it was on its way) may have been run and
///   admitted by Redis, and the layer then asks again. Each ask of this process for a key is
///   numbered, and the key's hash records the ones it admitted (`a:`, `m:`, `w:PROCESS`, while
///   their answers may not have been heard); the process's next ask for the key carries the
///   lost ones, and if the key admitted one, the ask is given that cell: no second cell is
///   taken, and
///   [`fleet_requests`](Self::fleet_requests) counts one request. (Reject mode's class request,
///   both turns in one script, is not: see [`Backend::acquire_class_or_refuse`].)
/// - **The streak is the fleet's**: while a key's 1302 streak runs, an admission says so
///   ([`Backend::streak_running`]), and the layer of a process that never received a pause
///   reports its successes too: any process's success resets the streak.
/// - **An adaptive key at its ceiling reports no success**: an admission's reply says whether
///   the key's adaptive rate is at its ceiling where a success changes nothing (no 1302 since
///   the last success, no caution it would end: [`Backend::adaptive_at_ceiling`]); such a key
///   costs one script a request, as a fixed quota does. A 1302 another process reports is
///   learned at the next admission here.
///
/// # Clone
///
/// Clones share the connection, the fallback state and the process's place in each key's
/// fleet queue. Give each [`GcraLayer`](kling_ratelimit::GcraLayer) its own `RedisGcra`
/// (built on a clone of the [`Connection`]), as `KlingLayer` does: two layers over clones of
/// one would hold one place between them for a key they both wait for, and the last waiter of
/// one giving up would take it from the other's head until that head asks again (a cell later
/// at most).
#[derive(Clone)]
pub struct RedisGcra {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Connection,
    when_unreachable: WhenUnreachable,
    retry_every: Duration,
    idle_ttl: Duration,
    arrival_order: bool,
    place_ttl: Duration,
    usage_window: Duration,
    count_requests: bool,
    /// This process's place id in the fleet queues.
    instance: String,
    fallback: InProcess,
    /// Whether the last command failed for want of Redis.
    out: AtomicBool,
    /// This process's asks of each key whose answers it has not heard, by Redis key.
    asks: Mutex<HashMap<String, Asks>>,
    /// The asks this process made of any key: where a key's numbering starts afresh
    /// ([`Ask::start`]), past every number it used before.
    asked: AtomicU64,
    /// The account-wide keys (Redis names) whose last admission here said a 1302 streak is
    /// running there ([`Backend::streak_running`]).
    streaks: Mutex<HashSet<String>>,
    /// Whether `streaks` holds any key: the usual success asks nothing more.
    any_streak: AtomicBool,
    /// The account-wide adaptive keys (Redis names) whose last admission or report here said
    /// their rate is at its ceiling with nothing a success would change, each with that ceiling
    /// (requests a second, its bits): their successes are not reported
    /// ([`Backend::adaptive_at_ceiling`]). At most [`MAX_AT_CEILING`] keys (one left out only
    /// has its successes reported).
    at_ceiling: Mutex<HashMap<String, u64>>,
    /// Whether `at_ceiling` holds any key.
    any_at_ceiling: AtomicBool,
    /// Bumped (under `at_ceiling`'s lock) when this process reports a 1302, before the report
    /// is sent: a reply saying a key is at its ceiling counts only if no bump came between its
    /// script being sent and its reply being noted, since that script may have run before the
    /// 1302 reached Redis ([`Inner::saw_ceiling`]).
    throttles: AtomicU64,
    /// Pauses Redis did not take: held here, and kept for delivery.
    undelivered: Mutex<Undelivered>,
    /// Whether `undelivered` holds a pause in force here (or one that ended, not yet dropped).
    paused_here: AtomicBool,
    /// Whether `undelivered` holds pauses to deliver.
    to_deliver: AtomicBool,
    /// One delivery at a time, so pauses reach Redis in the order they came.
    delivering: tokio::sync::Mutex<()>,
    /// The end of the fleet's pause of each key as Redis last told this process (a refusal
    /// or a report's reply), by Redis key: held here until it ends ([`Inner::heard_hold`]),
    /// should Redis lose it (a restart, a failover to a lagging replica), and where the
    /// fallback starts from when Redis goes away during it.
    heard: Mutex<HashMap<String, Instant>>,
    /// The latest end in `heard`, nanoseconds past `epoch`, or 0 once a decision found it
    /// past: while no pause heard of runs, a decision reads this and nothing more. Raised
    /// under `heard`'s lock; only [`Inner::heard_hold`] lowers it, to 0, from the value it
    /// read.
    heard_until: AtomicU64,
    /// What `heard_until` counts from.
    epoch: Instant,
    acquire: Script,
    acquire_class: Script,
    feedback: Script,
    leave: Script,
    usage: Script,
}

impl fmt::Debug for RedisGcra {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisGcra")
            .field("conn", &self.inner.conn)
            .field("when_unreachable", &self.inner.when_unreachable)
            .field("retry_every", &self.inner.retry_every)
            .field("arrival_order", &self.inner.arrival_order)
            .field("place_ttl", &self.inner.place_ttl)
            .field("usage_window", &self.inner.usage_window)
            .field("count_requests", &self.inner.count_requests)
            .field("out", &self.inner.out.load(Ordering::Relaxed))
            .finish()
    }
}

impl RedisGcra {
    /// A backend on `conn`, failing closed by waiting while Redis is away.
    pub fn new(conn: Connection) -> Self {
        RedisGcra::with_options(
            conn,
            Options {
                when_unreachable: WhenUnreachable::default(),
                retry_every: DEFAULT_RETRY_EVERY,
                idle_ttl: DEFAULT_IDLE_TTL,
                arrival_order: true,
                place_ttl: DEFAULT_GCRA_PLACE_TTL,
                usage_window: DEFAULT_USAGE_WINDOW,
                count_requests: true,
            },
        )
    }

    fn with_options(conn: Connection, o: Options) -> Self {
        RedisGcra {
            inner: Arc::new(Inner {
                conn,
                when_unreachable: o.when_unreachable,
                retry_every: o.retry_every,
                idle_ttl: o.idle_ttl,
                arrival_order: o.arrival_order,
                place_ttl: o.place_ttl,
                usage_window: o.usage_window,
                count_requests: o.count_requests,
                instance: instance_id(),
                fallback: InProcess::new(),
                out: AtomicBool::new(false),
                asks: Mutex::new(HashMap::new()),
                asked: AtomicU64::new(0),
                streaks: Mutex::new(HashSet::new()),
                any_streak: AtomicBool::new(false),
                at_ceiling: Mutex::new(HashMap::new()),
                any_at_ceiling: AtomicBool::new(false),
                throttles: AtomicU64::new(0),
                undelivered: Mutex::new(Undelivered::default()),
                paused_here: AtomicBool::new(false),
                to_deliver: AtomicBool::new(false),
                delivering: tokio::sync::Mutex::new(()),
                heard: Mutex::new(HashMap::new()),
                heard_until: AtomicU64::new(0),
                epoch: Instant::now(),
                acquire: Script::new(&format!(
                    "local USAGE_BUCKETS = {USAGE_BUCKETS}\n{QUEUE}{GCRA_FN}{ACQUIRE_BODY}"
                )),
                acquire_class: Script::new(&format!(
                    "local USAGE_BUCKETS = {USAGE_BUCKETS}\n{QUEUE}{GCRA_FN}{ACQUIRE_CLASS_BODY}"
                )),
                feedback: Script::new(FEEDBACK),
                leave: Script::new(&format!("{QUEUE}{LEAVE_BODY}")),
                usage: Script::new(&format!(
                    "local USAGE_BUCKETS = {USAGE_BUCKETS}\n{USAGE_BODY}"
                )),
            }),
        }
    }

    fn with(self, f: impl FnOnce(&mut Options)) -> Self {
        let i = &self.inner;
        let mut options = Options {
            when_unreachable: i.when_unreachable,
            retry_every: i.retry_every,
            idle_ttl: i.idle_ttl,
            arrival_order: i.arrival_order,
            place_ttl: i.place_ttl,
            usage_window: i.usage_window,
            count_requests: i.count_requests,
        };
        f(&mut options);
        RedisGcra::with_options(i.conn.clone(), options)
    }

    /// What to do while Redis is unreachable (default [`WhenUnreachable::Wait`]).
    pub fn when_unreachable(self, choice: WhenUnreachable) -> Self {
        self.with(|o| o.when_unreachable = choice)
    }

    /// How often a waiting request asks an unreachable Redis again (default 100 ms), and how
    /// often pauses it could not take are offered to it again. Kept between 1 ms and a year.
    pub fn retry_every(self, every: Duration) -> Self {
        self.with(|o| o.retry_every = every.clamp(Duration::from_millis(1), MAX_DURATION))
    }

    /// How long an idle key keeps its state (default [`DEFAULT_IDLE_TTL`]): a key's hash
    /// expires this long after the latest of its pace, its pause and its 1302 streak window.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `idle_ttl` when `ttl` is zero: the key would expire the
    /// instant its pause or pace is over, forgetting the streak that escalates the next
    /// pause and the adaptive rate; or longer than a year.
    pub fn idle_ttl(self, ttl: Duration) -> Result<Self, ConfigError> {
        if ttl.is_zero() {
            return Err(ConfigError::new("idle_ttl", "must be longer than zero"));
        }
        if ttl > MAX_DURATION {
            return Err(ConfigError::new("idle_ttl", "must be at most a year"));
        }
        Ok(self.with(|o| o.idle_ttl = ttl))
    }

    /// Whether the next cell of a key goes to the request that has waited for it longest, in
    /// whichever process (default `true`). With `false`, whichever process asks first at the
    /// instant a cell frees gets it, so the process nearest to Redis can starve the others.
    /// Every process sharing a key should choose the same; one that does not take part still
    /// waits behind the requests that hold places, as if each of its asks had just arrived.
    pub fn arrival_order(self, on: bool) -> Self {
        self.with(|o| o.arrival_order = on)
    }

    /// How long a process's place in a key's queue lasts past the instant it was told to ask
    /// again (default [`DEFAULT_GCRA_PLACE_TTL`]): what a process that stops asking without
    /// leaving (it crashed, or lost Redis) can cost the others. Keep it well above a round trip
    /// to Redis plus the time a busy process may take to wake: a process that asks later than
    /// that loses its place. Kept between 1 ms and a year.
    pub fn place_ttl(self, ttl: Duration) -> Self {
        self.with(|o| o.place_ttl = ttl.clamp(Duration::from_millis(1), MAX_DURATION))
    }

    /// The window [`fleet_requests`](Self::fleet_requests) counts over (default
    /// [`DEFAULT_USAGE_WINDOW`]; a preset sped up for tests scales it as it scales the
    /// minute). Every process of a fleet should use the same: the counts are kept in buckets
    /// of a sixtieth of it. Kept between 60 µs and a year.
    pub fn usage_window(self, window: Duration) -> Self {
        self.with(|o| {
            o.usage_window = window.clamp(Duration::from_micros(USAGE_BUCKETS.into()), MAX_DURATION)
        })
    }

    /// Whether the acquire script counts the requests it admits under an account-wide key,
    /// for [`fleet_requests`](Self::fleet_requests) (default `true`). Counting costs a hash
    /// increment per admitted request: one process driving Redis with 64 decisions in flight
    /// makes about 13% fewer a second with it (the crate README's bench); a fleet that does
    /// not watch its rate usage, or watches it elsewhere, can turn it off. Off, this process's
    /// snapshots show no fleet figure (each process's monitor counts its own requests again),
    /// and a fleet whose processes differ counts only the requests of those that count.
    pub fn count_requests(self, on: bool) -> Self {
        self.with(|o| o.count_requests = on)
    }

    /// The requests the whole fleet was admitted under an account's account-wide key over the
    /// last [`usage_window`](Self::usage_window) (retried attempts included: each asks the
    /// limiter again), to the nearest sixtieth of it. Requests admitted in process while Redis
    /// was unreachable ([`WhenUnreachable::fallback`]) are not counted, nor those of a process
    /// that does not [`count_requests`](Self::count_requests).
    pub async fn fleet_requests(&self, account: Option<&AccountId>) -> Result<u64, StoreError> {
        let key = format!("{}:n", self.key_of(&BucketKey::account(account.cloned())));
        let args = [
            self.inner.conn.calibrated_now_us().await?.to_string(),
            self.inner.bucket_us().to_string(),
        ];
        let sum: i64 = self
            .inner
            .conn
            .run(&self.inner.usage, &[key], &args)
            .await?;
        Ok(u64::try_from(sum).unwrap_or(0))
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.inner.conn
    }

    /// Whether the last command found Redis unreachable.
    pub fn is_out(&self) -> bool {
        self.inner.out.load(Ordering::Relaxed)
    }

    /// One decision at an explicit fleet time `now_us` (Unix microseconds), without the
    /// unreachable-Redis handling: what [`Backend::acquire`] does with the current time. For
    /// simulations and tests that replay an arrival pattern.
    pub async fn decide_at(
        &self,
        key: &BucketKey,
        policy: &Policy,
        now_us: i64,
    ) -> Result<FleetDecision, StoreError> {
        // A simulation's decision takes no place (it still waits behind those who hold one).
        self.inner
            .decide(
                self.key_of(key),
                policy,
                now_us,
                None,
                key.request_kind().is_none(),
                None,
            )
            .await
            .map(|(decision, ..)| decision)
    }

    /// The Redis key of a bucket.
    pub fn key_of(&self, key: &BucketKey) -> String {
        let account = key
            .account_id()
            .map_or_else(|| "-".to_owned(), |a| segment(a.as_str()));
        match key.request_kind() {
            Some(kind) => self
                .inner
                .conn
                .key(&format!("gcra:{account}:{}", kind.as_str())),
            None => self.inner.conn.key(&format!("gcra:{account}")),
        }
    }
}

/// A decision in fleet time (Unix microseconds on the Redis server's clock), from
/// [`RedisGcra::decide_at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FleetDecision {
    /// The request may go; its cell is taken.
    Admit,
    /// Nothing was taken; ask again at `at_us`.
    NotBefore {
        /// Fleet time, microseconds.
        at_us: i64,
        /// Whether the key is paused by a cooldown.
        cooldown: bool,
    },
}

/// Pauses whose report Redis did not take (unreachable, timed out, or refused): each holds in
/// this process until it ends, and those Redis could not be reached for wait to be delivered.
#[derive(Debug, Default)]
struct Undelivered {
    /// The end of each key's pause here, by Redis key.
    paused: HashMap<String, Instant>,
    /// Reports to send when Redis answers again, oldest first.
    pending: VecDeque<Report>,
    /// Whether a task delivers them.
    delivering: bool,
    /// The number of the next pause reported.
    next: u64,
    /// The numbers of the pauses on their first way to Redis: the key may have taken them.
    in_flight: BTreeSet<u64>,
    /// The number of the report a delivery sent last and has not seen taken: on its way, or
    /// sent by a delivery cut short or whose answer was lost, so Redis may have run it. It is
    /// neither merged into nor moved (sent again, Redis skips it by its number), and only it
    /// is taken off once sent.
    sending: Option<u64>,
}

impl Undelivered {
    /// Keeps `report` for delivery. Past [`MAX_UNDELIVERED`] reports, it is merged into a
    /// report of its key kept earlier, else each key's reports are merged into one, so no
    /// key's pause is dropped: the fleet would not pause.
    fn keep(&mut self, report: Report) {
        if self.pending.len() >= MAX_UNDELIVERED {
            let sending = self.sending;
            let earlier = self
                .pending
                .iter_mut()
                .rev()
                .find(|r| r.redis_key == report.redis_key && Some(r.n) != sending);
            if let Some(earlier) = earlier {
                let held = self.paused.get(&report.redis_key).copied();
                earlier.merge(&report, held);
                // Under a new number: the key may have taken the earlier's (its first attempt
                // timed out), and would skip what was merged in with it.
                earlier.n = self.next;
                self.next += 1;
                return;
            }
            self.merge_each_key();
        }
        self.pending.push_back(report);
    }

    /// Numbers a pause about to be reported: it keeps its number when it is kept for
    /// delivery, so the key takes it once, whichever of its sends Redis ran.
    fn number(&mut self) -> u64 {
        let n = self.next;
        self.next += 1;
        self.in_flight.insert(n);
        n
    }

    /// The lowest number this process may still send: the key forgets those below.
    fn floor(&self) -> u64 {
        let pending = self.pending.iter().map(|r| r.n).min();
        let in_flight = self.in_flight.first().copied();
        [pending, in_flight]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.next)
    }

    /// Merges each key's reports (but the one being sent) into its earliest.
    fn merge_each_key(&mut self) {
        let before = self.pending.len();
        let mut kept: Vec<Report> = Vec::with_capacity(before);
        let mut first: HashMap<String, usize> = HashMap::new();
        for report in self.pending.drain(..) {
            if Some(report.n) == self.sending {
                kept.push(report);
                continue;
            }
            match first.get(&report.redis_key) {
                Some(&into) => {
                    let held = self.paused.get(&report.redis_key).copied();
                    kept[into].merge(&report, held);
                    // A new number, as in `keep`.
                    kept[into].n = self.next;
                    self.next += 1;
                }
                None => {
                    first.insert(report.redis_key.clone(), kept.len());
                    kept.push(report);
                }
            }
        }
        self.pending = kept.into();
        if self.pending.len() < before {
            tracing::warn!(
                max = MAX_UNDELIVERED,
                "many pauses kept for redis: each key's are merged into one"
            );
        }
    }

    /// Takes off the report numbered `n` (sent, or refused).
    fn sent(&mut self, n: u64) {
        if let Some(at) = self.pending.iter().position(|r| r.n == n) {
            self.pending.remove(at);
        }
        self.sending = None;
    }
}

/// A pause's first attempt, from its number until it ends (answered, kept, or dropped): until
/// then the key keeps the number among those it took.
struct FirstAttempt {
    inner: Arc<Inner>,
    n: u64,
}

impl FirstAttempt {
    fn start(inner: &Arc<Inner>) -> Self {
        let n = lock(&inner.undelivered).number();
        FirstAttempt {
            inner: Arc::clone(inner),
            n,
        }
    }
}

impl Drop for FirstAttempt {
    fn drop(&mut self) {
        lock(&self.inner.undelivered).in_flight.remove(&self.n);
    }
}

/// A report kept for delivery: its times are this process's instants, turned into fleet time
/// when it is sent.
#[derive(Clone, Debug)]
struct Report {
    redis_key: String,
    policy: Policy,
    feedback: Feedback,
    /// What the `Retry-After` of the pause whose times `feedback` carries asked for, from its
    /// arrival: the fleet's adaptive caution is measured from it. Not from `resume_at`, which
    /// a merge moves to the latest end of the merged pauses and of the one held here (another
    /// answer's `Retry-After`, or the cooldown's own escalation): a bare 1302 would read as
    /// one that cost the whole escalated pause.
    retry_after: Option<Duration>,
    /// Its number in the queue ([`Undelivered::keep`]).
    n: u64,
}

impl Report {
    /// Merges `later`, a later report of the same key, into this one: the pause ends at the
    /// latest of their ends and of `held` (the pause this process holds for the key), and is
    /// a 1302 (counted in the fleet's streak) if either was, with that 1302's times (the
    /// later's, unless it was sent before this one arrived).
    fn merge(&mut self, later: &Report, held: Option<Instant>) {
        let (
            Feedback::Pause {
                sent_at,
                received_at,
                resume_at,
                throttled,
            },
            Feedback::Pause {
                sent_at: later_sent,
                received_at: later_received,
                resume_at: later_resume,
                throttled: later_throttled,
            },
        ) = (self.feedback, later.feedback)
        else {
            return;
        };
        // A 1302 sent before this one arrived is not counted (in process, nor by the script
        // after this one): this one's times and `Retry-After` stay, and the caution they set.
        let later_counted = later_throttled && (!throttled || later_sent >= received_at);
        let (sent_at, received_at, retry_after) = if later_counted || !throttled {
            (later_sent, later_received, later.retry_after)
        } else {
            (sent_at, received_at, self.retry_after)
        };
        self.retry_after = retry_after;
        let resume_at = [resume_at, later_resume, held].into_iter().flatten().max();
        self.feedback = Feedback::Pause {
            sent_at,
            received_at,
            resume_at,
            throttled: throttled || later_throttled,
        };
        self.policy = later.policy;
    }
}

/// The most lost asks of a key a process keeps to be replayed; past it the oldest is dropped
/// (if Redis admitted it, its cell is not given to a later ask).
const MAX_LOST: usize = 16;

/// One key's asks of this process whose answers it has not heard: in flight, or lost (a
/// timeout, a dropped connection, or a dropped request: Redis may have run them). Numbered
/// one after the other; when the key has none left, the next starts from the count of the
/// process's asks of every key, past every number the key used before, so that its numbers
/// never repeat (the record in its hash, `ACQUIRE_BODY`'s, names asks by them) and stay far
/// below 2⁵³ (Lua's numbers are doubles).
#[derive(Debug, Default)]
struct Asks {
    next: u64,
    in_flight: Vec<u64>,
    lost: Vec<u64>,
}

/// What an answer said of the lost asks its ask carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Looked {
    /// The key had admitted this one: the ask was given its cell.
    Redeemed(u64),
    /// None of them had been admitted.
    NoneAdmitted,
    /// They were not looked at (the key is paused, or there were none).
    Skipped,
}

/// One ask of a key, numbered: unless it ends with an answer ([`Ask::heard`]), it is lost.
struct Ask<'a> {
    inner: &'a Inner,
    redis_key: &'a str,
    n: u64,
    /// The lowest number of the key's asks whose answer is not heard (this one's included).
    floor: u64,
    lost: Vec<u64>,
    ended: bool,
}

impl<'a> Ask<'a> {
    fn start(inner: &'a Inner, redis_key: &'a str) -> Self {
        let asked = inner.asked.fetch_add(1, Ordering::Relaxed);
        let mut asks = lock(&inner.asks);
        let entry = match asks.get_mut(redis_key) {
            Some(entry) => entry,
            None => asks.entry(redis_key.to_owned()).or_insert(Asks {
                next: asked,
                ..Asks::default()
            }),
        };
        let n = entry.next;
        entry.next += 1;
        entry.in_flight.push(n);
        let floor = entry
            .in_flight
            .iter()
            .chain(&entry.lost)
            .copied()
            .min()
            .unwrap_or(n);
        Ask {
            inner,
            redis_key,
            n,
            floor,
            lost: entry.lost.clone(),
            ended: false,
        }
    }

    /// The lost asks it carries, as the script takes them.
    fn lost_arg(&self) -> String {
        let lost: Vec<String> = self.lost.iter().map(u64::to_string).collect();
        lost.join(",")
    }

    /// Its answer came: the lost asks it carried are settled as it says.
    fn heard(mut self, looked: Looked) {
        self.end(looked, false);
    }

    /// Its answer was lost, and the request it asked for was admitted elsewhere (the
    /// fallback): a cell Redis may have given it stands for that request, and is not replayed.
    fn used(mut self) {
        self.end(Looked::Skipped, false);
    }

    fn end(&mut self, looked: Looked, lost: bool) {
        self.ended = true;
        let mut asks = lock(&self.inner.asks);
        let Some(entry) = asks.get_mut(self.redis_key) else {
            return;
        };
        entry.in_flight.retain(|n| *n != self.n);
        match looked {
            Looked::Redeemed(m) => entry.lost.retain(|n| *n != m),
            Looked::NoneAdmitted => entry.lost.retain(|n| !self.lost.contains(n)),
            Looked::Skipped => {}
        }
        if lost {
            entry.lost.push(self.n);
            if entry.lost.len() > MAX_LOST {
                entry.lost.remove(0);
            }
        }
        if entry.in_flight.is_empty() && entry.lost.is_empty() {
            asks.remove(self.redis_key);
        }
    }
}

impl Drop for Ask<'_> {
    /// Ended without its answer (failed, or its request dropped while it was on its way):
    /// Redis may have admitted it, and the key's next ask from this process is given its cell.
    fn drop(&mut self) {
        if !self.ended {
            self.end(Looked::Skipped, true);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The boxed future of a remote decision.
pub type GcraFuture<T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send>>;

fn adaptive_args(policy: &Policy) -> (bool, f64, f64) {
    let ceiling = policy.quota.rate_per_second();
    match &policy.adaptive {
        Some(a) => (true, a.start.unwrap_or(-1.0), ceiling),
        None => (false, -1.0, ceiling),
    }
}

/// A key's quota as the acquire scripts take it: period (µs, rounded up), burst, adaptive
/// (0/1), adaptive start rate (-1: ceiling/4), ceiling rate.
fn quota_args(policy: &Policy) -> [String; 5] {
    let (adaptive, start, ceiling) = adaptive_args(policy);
    [
        micros(policy.quota.period()).max(1).to_string(),
        policy.quota.burst().to_string(),
        if adaptive { "1" } else { "0" }.to_owned(),
        format!("{start:e}"),
        format!("{ceiling:e}"),
    ]
}

/// The adaptive target and probe the acquire scripts take to tell whether a success at the
/// ceiling would end a caution held (`''` each for a fixed quota).
fn step_args(policy: &Policy) -> [String; 2] {
    match &policy.adaptive {
        Some(a) => [format!("{:e}", a.target), format!("{:e}", a.probe)],
        None => [String::new(), String::new()],
    }
}

/// What a pause's `Retry-After` asked for, from the answer's arrival: what the adaptive
/// caution is measured from, as in process.
fn retry_after_of(feedback: &Feedback) -> Option<Duration> {
    match *feedback {
        Feedback::Pause {
            received_at,
            resume_at,
            ..
        } => resume_at.map(|at| at.saturating_duration_since(received_at)),
        _ => None,
    }
}

fn share(policy: &Policy, processes: u32) -> Policy {
    let quota = policy.quota.share(processes);
    Policy::new(quota, policy.cooldown).with_adaptive(policy.adaptive)
}

/// The last number of a kept report of the process `instance` that the key whose hash is
/// `redis_key` took (see `FEEDBACK`).
fn delivered_key(redis_key: &str, instance: &str) -> String {
    format!("{redis_key}:d:{instance}")
}

/// The fleet queue of the key whose hash is `redis_key`: by arrival, and by each place's end.
fn queue_keys(redis_key: &str) -> [String; 2] {
    [format!("{redis_key}:wq"), format!("{redis_key}:wqx")]
}

impl Inner {
    /// A usage bucket, µs.
    fn bucket_us(&self) -> i64 {
        (micros(self.usage_window) / i64::from(USAGE_BUCKETS)).max(1)
    }

    /// One decision; `since` is when the asking request began waiting, if it takes its
    /// process's place in the fleet's order; `counted` for an account-wide key, whose admitted
    /// requests [`RedisGcra::fleet_requests`] counts; `ask` its number, with which the key
    /// records it if it admits it, and the lost asks it carries ([`ACQUIRE_BODY`]). With the
    /// decision, whether the key's 1302 streak is running and whether its adaptive rate is at
    /// the ceiling with nothing a success would change (both said by an admission only), and
    /// what the key said of the lost asks.
    async fn decide(
        &self,
        redis_key: String,
        policy: &Policy,
        now_us: i64,
        since: Option<i64>,
        counted: bool,
        ask: Option<&Ask<'_>>,
    ) -> Result<(FleetDecision, bool, bool, Looked), StoreError> {
        let [period, burst, adaptive, start, ceiling] = quota_args(policy);
        let [target, probe] = step_args(policy);
        let (instance, n, floor, lost) = match ask {
            Some(ask) => (
                self.instance.clone(),
                ask.n.to_string(),
                ask.floor.to_string(),
                ask.lost_arg(),
            ),
            None => Default::default(),
        };
        let args = [
            now_us.to_string(),
            period,
            burst,
            adaptive,
            start,
            ceiling,
            micros(self.idle_ttl).to_string(),
            if since.is_some() {
                self.instance.clone()
            } else {
                String::new()
            },
            since.unwrap_or(now_us).to_string(),
            micros(self.place_ttl).max(1).to_string(),
            self.bucket_us().to_string(),
            instance,
            n,
            floor,
            lost,
            target,
            probe,
        ];
        let [q, qx] = queue_keys(&redis_key);
        let result: Result<Vec<i64>, StoreError> = if counted {
            let count = format!("{redis_key}:n");
            let keys = [redis_key, q, qx, count];
            self.conn.run(&self.acquire, &keys, &args).await
        } else {
            self.conn
                .run(&self.acquire, &[redis_key, q, qx], &args)
                .await
        };
        self.note(&result);
        match result?.as_slice() {
            [0, streak, replayed, at_ceiling] => {
                let looked = match u64::try_from(*replayed) {
                    Ok(m) => Looked::Redeemed(m),
                    Err(_) if *replayed == -1 => Looked::NoneAdmitted,
                    Err(_) => Looked::Skipped,
                };
                Ok((FleetDecision::Admit, *streak == 1, *at_ceiling == 1, looked))
            }
            [1, at, cooldown, looked] => Ok((
                FleetDecision::NotBefore {
                    at_us: *at,
                    cooldown: *cooldown == 1,
                },
                false,
                false,
                if *looked == 1 {
                    Looked::NoneAdmitted
                } else {
                    Looked::Skipped
                },
            )),
            other => Err(StoreError::protocol(format!("gcra reply {other:?}"))),
        }
    }

    /// Reject mode's decision of a class request ([`ACQUIRE_CLASS_BODY`]): the turns of the
    /// class key `class` and of its account key `account` (Redis keys), both or neither. It
    /// takes no place in either key's fleet queue, and waits behind those who hold one.
    /// `counted` if the account key's admitted requests are counted. With the decision, whether
    /// the account key's 1302 streak is running and whether its adaptive rate is at the
    /// ceiling with nothing a success would change (both said by an admission only), and
    /// whether the account key refused (a refusal only; else the class key did).
    async fn decide_class(
        &self,
        class: (String, &Policy),
        account: (String, &Policy),
        now_us: i64,
        counted: bool,
    ) -> Result<(FleetDecision, bool, bool, bool), StoreError> {
        let [period, burst, adaptive, start, ceiling] = quota_args(class.1);
        let [a_period, a_burst, a_adaptive, a_start, a_ceiling] = quota_args(account.1);
        let [a_target, a_probe] = step_args(account.1);
        let args = [
            now_us.to_string(),
            period,
            burst,
            adaptive,
            start,
            ceiling,
            micros(self.idle_ttl).to_string(),
            String::new(),
            now_us.to_string(),
            micros(self.place_ttl).max(1).to_string(),
            self.bucket_us().to_string(),
            a_period,
            a_burst,
            a_adaptive,
            a_start,
            a_ceiling,
            a_target,
            a_probe,
        ];
        let [q, qx] = queue_keys(&class.0);
        let [aq, aqx] = queue_keys(&account.0);
        let mut keys = vec![class.0, q, qx];
        if counted {
            keys.push(format!("{}:n", account.0));
        }
        keys.splice(3..3, [account.0, aq, aqx]);
        let result: Result<Vec<i64>, StoreError> =
            self.conn.run(&self.acquire_class, &keys, &args).await;
        self.note(&result);
        match result?.as_slice() {
            [0, streak, at_ceiling] => {
                Ok((FleetDecision::Admit, *streak == 1, *at_ceiling == 1, false))
            }
            [1, at, cooldown, which] => Ok((
                FleetDecision::NotBefore {
                    at_us: *at,
                    cooldown: *cooldown == 1,
                },
                false,
                false,
                *which == 1,
            )),
            other => Err(StoreError::protocol(format!("gcra class reply {other:?}"))),
        }
    }

    /// Notes what an admission (or a report) said of the account-wide key `redis_key`'s
    /// streak, for [`Backend::streak_running`]. Costs nothing while no streak is noted and
    /// none is running.
    fn saw_streak(&self, redis_key: &str, running: bool) {
        if !running && !self.any_streak.load(Ordering::Relaxed) {
            return;
        }
        let mut streaks = lock(&self.streaks);
        if running {
            if !streaks.contains(redis_key) {
                streaks.insert(redis_key.to_owned());
            }
        } else {
            streaks.remove(redis_key);
        }
        self.any_streak
            .store(!streaks.is_empty(), Ordering::Relaxed);
    }

    /// Notes what an admission or a report said of the account-wide key `redis_key` under
    /// `policy`: whether its adaptive rate is at the ceiling with nothing a success would
    /// change, for [`Backend::adaptive_at_ceiling`]. `asked` is what [`Inner::throttles`] held
    /// before the script was sent: a 1302 this process reported since makes an "at its
    /// ceiling" stale (the script may have run before that 1302 reached Redis), and the key is
    /// noted as not at it. Costs nothing while no key is noted and this one is not at its
    /// ceiling (a fixed quota's
    /// never is).
    fn saw_ceiling(&self, redis_key: &str, policy: &Policy, at_ceiling: bool, asked: u64) {
        if !at_ceiling && !self.any_at_ceiling.load(Ordering::Relaxed) {
            return;
        }
        let ceiling = policy.quota.rate_per_second().to_bits();
        let mut keys = lock(&self.at_ceiling);
        if at_ceiling && self.throttles.load(Ordering::Relaxed) == asked {
            if let Some(noted) = keys.get_mut(redis_key) {
                *noted = ceiling;
            } else {
                if keys.len() >= MAX_AT_CEILING {
                    // Full: one key (any) has its successes reported until its next admission.
                    let out = keys.keys().next().cloned();
                    if let Some(out) = out {
                        keys.remove(&out);
                    }
                }
                keys.insert(redis_key.to_owned(), ceiling);
            }
        } else {
            keys.remove(redis_key);
        }
        self.any_at_ceiling
            .store(!keys.is_empty(), Ordering::Relaxed);
    }

    /// A 1302 this process reports for `redis_key`: the key is not at its ceiling here, and the
    /// replies of scripts sent before this say nothing of it ([`Inner::throttles`]).
    fn throttled_here(&self, redis_key: &str) {
        let mut keys = lock(&self.at_ceiling);
        self.throttles.fetch_add(1, Ordering::Relaxed);
        keys.remove(redis_key);
        self.any_at_ceiling
            .store(!keys.is_empty(), Ordering::Relaxed);
    }

    /// The end of a pause of `redis_key` that Redis did not take, if it holds at `now`.
    fn held_pause(&self, redis_key: &str, now: Instant) -> Option<Instant> {
        let mut undelivered = lock(&self.undelivered);
        undelivered.paused.retain(|_, until| *until > now);
        self.paused_here
            .store(!undelivered.paused.is_empty(), Ordering::Relaxed);
        undelivered.paused.get(redis_key).copied()
    }

    /// Sends one report to Redis, stamped with fleet time now (a report kept for delivery is
    /// sent later than it was made: its own instants are turned into fleet time as it is sent).
    /// A pause goes with its number (`number`), on its first attempt and when kept for
    /// delivery: the key takes each once, however often a send whose answer was lost sends it.
    async fn send_feedback(
        &self,
        redis_key: &str,
        policy: &Policy,
        feedback: Feedback,
        retry_after: Option<Duration>,
        number: Option<u64>,
    ) -> Result<Reported, StoreError> {
        let asked = self.throttles.load(Ordering::Relaxed);
        // Reported times go into the fleet's state too: measured against the server's clock.
        let now_us = self.conn.calibrated_now_us().await;
        let now = Instant::now();
        let now_us = match now_us {
            Ok(now_us) => now_us,
            Err(e) => {
                self.note(&Err::<(), _>(e.clone()));
                return Err(e);
            }
        };
        let fleet = |t: Instant| self.conn.to_fleet(t, now, now_us).to_string();
        // For a 1302's caution: the wait its `Retry-After` asked for less the header's
        // resolution, seconds, measured from the instants as in process (not from their fleet
        // times, a microsecond coarser), so the fleet's caution is the in-process one.
        let excess = retry_after
            .map(|wait| {
                format!(
                    "{:e}",
                    wait.as_secs_f64() - RETRY_AFTER_RESOLUTION.as_secs_f64()
                )
            })
            .unwrap_or_default();
        let (kind, sent, received, resume, throttled) = match feedback {
            Feedback::Success { sent_at } => {
                ("s", fleet(sent_at), String::new(), String::new(), false)
            }
            Feedback::Pause {
                sent_at,
                received_at,
                resume_at,
                throttled,
            } => (
                "p",
                fleet(sent_at),
                fleet(received_at),
                resume_at.map(fleet).unwrap_or_default(),
                throttled,
            ),
            _ => return Ok(Reported::default()),
        };
        let (adaptive, start, ceiling) = adaptive_args(policy);
        let a = policy.adaptive.unwrap_or_default();
        let c = policy.cooldown;
        let args = [
            now_us.to_string(),
            kind.to_owned(),
            sent,
            received,
            resume,
            if throttled { "1" } else { "0" }.to_owned(),
            micros(policy.quota.period()).max(1).to_string(),
            if adaptive { "1" } else { "0" }.to_owned(),
            format!("{start:e}"),
            format!("{ceiling:e}"),
            format!("{:e}", a.growth),
            format!("{:e}", a.decrease),
            format!("{:e}", a.target),
            format!("{:e}", a.probe),
            micros(c.first).to_string(),
            c.escalate_after.to_string(),
            micros(c.backoff).to_string(),
            micros(c.ceiling).to_string(),
            micros(c.window).to_string(),
            micros(self.idle_ttl).to_string(),
            excess,
            format!("{:e}", a.max_caution),
        ];
        let result: Result<Vec<i64>, StoreError> = match number {
            None => {
                self.conn
                    .run(&self.feedback, &[redis_key.to_owned()], &args)
                    .await
            }
            Some(n) => {
                let keys = [
                    redis_key.to_owned(),
                    delivered_key(redis_key, &self.instance),
                ];
                let floor = lock(&self.undelivered).floor();
                let mut args = Vec::from(args);
                args.push(n.to_string());
                args.push(floor.to_string());
                self.conn.run(&self.feedback, &keys, &args).await
            }
        };
        self.note(&result);
        match result?.as_slice() {
            [until, streak, at_ceiling] => {
                let mut reported = Reported::default();
                reported.streak = u32::try_from(*streak).unwrap_or(0);
                reported.cooldown_until =
                    (*until >= 0).then(|| self.conn.to_instant(*until, now, now_us));
                if let Some(until) = reported.cooldown_until {
                    self.heard_pause(redis_key, until);
                }
                self.saw_streak(redis_key, reported.streak > 0);
                if policy.adaptive.is_some() {
                    self.saw_ceiling(redis_key, policy, *at_ceiling == 1, asked);
                }
                Ok(reported)
            }
            other => Err(StoreError::protocol(format!("feedback reply {other:?}"))),
        }
    }

    /// Sends the reports kept for delivery, oldest first, one delivery at a time. Fails, keeping
    /// the rest, when Redis cannot be reached; a report Redis refuses otherwise is dropped.
    async fn deliver(&self) -> Result<(), StoreError> {
        let one = self.delivering.lock().await;
        self.deliver_holding(one).await
    }

    /// [`Inner::deliver`] on a request's own way to Redis (a decision, a report): when another
    /// delivery is under way, the request goes on without waiting for it. Queued behind it,
    /// every request of an outage whose commands time out would wait its turn for every
    /// earlier one's timeout, the k-th k timeouts; this way each waits for at most its own
    /// command. Going on is safe: a key whose pause is still to be delivered is held by this
    /// process's own copy of the pause before Redis is asked (see `acquire`), and a report
    /// that goes ahead of a kept one only lands first.
    async fn deliver_first(&self) -> Result<(), StoreError> {
        match self.delivering.try_lock() {
            Ok(one) => self.deliver_holding(one).await,
            Err(_) => Ok(()),
        }
    }

    async fn deliver_holding(
        &self,
        _one: tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<(), StoreError> {
        loop {
            // Only a delivery takes reports off, and only one runs; the one it sends is not
            // merged meanwhile.
            let next = {
                let mut undelivered = lock(&self.undelivered);
                let next = undelivered.pending.front().cloned();
                undelivered.sending = next.as_ref().map(|r| r.n);
                next
            };
            let Some(report) = next else {
                return Ok(());
            };
            let result = self
                .send_feedback(
                    &report.redis_key,
                    &report.policy,
                    report.feedback,
                    report.retry_after,
                    Some(report.n),
                )
                .await;
            match result {
                // Redis may have run it (a timeout): it stays `sending`, merged into by no
                // later report, which its number would have Redis skip with it.
                Err(e) if e.keeps_changes() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, key = %report.redis_key, "redis refused a pause kept for delivery; dropped");
                }
                Ok(_) => {
                    tracing::debug!(key = %report.redis_key, "a pause kept while redis was away delivered");
                }
            }
            let mut undelivered = lock(&self.undelivered);
            undelivered.sent(report.n);
            self.to_deliver
                .store(!undelivered.pending.is_empty(), Ordering::Relaxed);
        }
    }

    /// What a report does when Redis did not take it (failed with `e`). A pause holds in this
    /// process until it ends (its length as the in-process fallback works it out) and, when
    /// Redis could not be reached, is kept and delivered when it answers again; under
    /// [`WhenUnreachable::Fallback`] an unreachable Redis's report is the fallback's answer,
    /// otherwise the error.
    fn not_taken(
        self: &Arc<Self>,
        e: StoreError,
        key: &BucketKey,
        redis_key: String,
        policy: &Policy,
        feedback: Feedback,
        number: Option<u64>,
    ) -> Result<Reported, BackendError> {
        let (processes, fallback) = match self.when_unreachable {
            WhenUnreachable::Fallback { processes } => (processes.get(), e.is_unreachable()),
            _ => (1, false),
        };
        if !matches!(feedback, Feedback::Pause { .. }) {
            return if fallback {
                Ok(self
                    .fallback
                    .feedback_now(key, &share(policy, processes), feedback))
            } else {
                Err(e.into_ratelimit())
            };
        }
        let local = self
            .fallback
            .feedback_now(key, &share(policy, processes), feedback);
        let mut undelivered = lock(&self.undelivered);
        if let Some(until) = local.cooldown_until {
            let held = undelivered.paused.entry(redis_key.clone()).or_insert(until);
            *held = (*held).max(until);
            self.paused_here.store(true, Ordering::Relaxed);
        }
        if e.keeps_changes() {
            // Under the number its first attempt went with (a pause always has one).
            let n = number.unwrap_or_else(|| undelivered.number());
            undelivered.keep(Report {
                redis_key,
                policy: *policy,
                feedback,
                retry_after: retry_after_of(&feedback),
                n,
            });
            self.to_deliver.store(true, Ordering::Relaxed);
            if !undelivered.delivering {
                undelivered.delivering = self.start_delivery();
            }
        }
        drop(undelivered);
        if fallback {
            Ok(local)
        } else {
            Err(e.into_ratelimit())
        }
    }

    /// Starts the task that delivers the kept reports once Redis answers: it tries every
    /// [`retry_every`](RedisGcra::retry_every) until none is left (or the backend is
    /// dropped). Without a runtime, the next decision or report delivers them.
    fn start_delivery(self: &Arc<Self>) -> bool {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let inner: Weak<Inner> = Arc::downgrade(self);
        let every = self.retry_every;
        handle.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let _ = inner.deliver().await;
                let mut undelivered = lock(&inner.undelivered);
                if undelivered.pending.is_empty() {
                    undelivered.delivering = false;
                    return;
                }
            }
        });
        true
    }

    /// Notes that Redis said the fleet's pause of `redis_key` lasts until `until`.
    fn heard_pause(&self, redis_key: &str, until: Instant) {
        let mut heard = lock(&self.heard);
        if let Some(known) = heard.get_mut(redis_key) {
            *known = (*known).max(until);
        } else {
            // Bounded by the keys paused now: those whose pause ended go first.
            if heard.len() >= MAX_UNDELIVERED {
                let now = Instant::now();
                heard.retain(|_, until| *until > now);
            }
            heard.insert(redis_key.to_owned(), until);
        }
        // (Never 0, which says no pause heard of runs.)
        let after_epoch = until.saturating_duration_since(self.epoch).as_nanos();
        let after_epoch = u64::try_from(after_epoch).unwrap_or(u64::MAX).max(1);
        self.heard_until.fetch_max(after_epoch, Ordering::Relaxed);
    }

    /// The end of the fleet's pause of `redis_key` that Redis last told this process of, if
    /// it holds now. Pauses only ever get longer in Redis, so what it said holds until then,
    /// whatever a Redis that lost it (restarted empty, or failed over to a replica that had
    /// not heard of it) says meanwhile. While no pause heard of runs (the usual decision,
    /// also once the last one ended and a decision found it past), one load and one
    /// comparison.
    fn heard_hold(&self, redis_key: &str) -> Option<Instant> {
        let latest = self.heard_until.load(Ordering::Relaxed);
        if latest == 0 {
            return None;
        }
        let now = Instant::now();
        if now >= self.epoch + Duration::from_nanos(latest) {
            // Every pause heard of ended. (Unless another was heard since, raising it.)
            let _ =
                self.heard_until
                    .compare_exchange(latest, 0, Ordering::Relaxed, Ordering::Relaxed);
            return None;
        }
        lock(&self.heard)
            .get(redis_key)
            .copied()
            .filter(|until| *until > now)
    }

    /// The decision when Redis failed with `e`: [`WhenUnreachable`]'s choice if it is out of
    /// reach, else the error. The fallback first takes on the fleet's pause of the key that
    /// this process last heard of, if it still runs: Redis alone held it.
    fn unreachable_decision(
        &self,
        e: StoreError,
        key: &BucketKey,
        redis_key: &str,
        policy: &Policy,
    ) -> Result<Decision, BackendError> {
        match self.when_unreachable {
            WhenUnreachable::Wait if e.is_unreachable() => Ok(Decision::NotBefore {
                at: Instant::now() + self.retry_every,
                cooldown: false,
            }),
            WhenUnreachable::Fallback { processes } if e.is_unreachable() => {
                let policy = self.fallback_for(key, redis_key, policy, processes.get());
                Ok(self.fallback.acquire_now(key, &policy))
            }
            _ => Err(e.into_ratelimit()),
        }
    }

    /// [`Inner::unreachable_decision`] of reject mode's class request: `class` and `account`
    /// are each key, its Redis key and its policy. The fallback takes both turns or neither
    /// ([`InProcess::acquire_class_now`]).
    fn unreachable_class_decision(
        &self,
        e: StoreError,
        class: (&BucketKey, &str, &Policy),
        account: (&BucketKey, &str, &Policy),
    ) -> Result<Decision, BackendError> {
        match self.when_unreachable {
            WhenUnreachable::Fallback { processes } if e.is_unreachable() => {
                let class_policy = self.fallback_for(class.0, class.1, class.2, processes.get());
                let account_policy =
                    self.fallback_for(account.0, account.1, account.2, processes.get());
                let (decision, _) = self.fallback.acquire_class_now(
                    class.0,
                    &class_policy,
                    account.0,
                    &account_policy,
                );
                Ok(decision)
            }
            _ => self.unreachable_decision(e, account.0, account.1, account.2),
        }
    }

    /// The fallback's share of `policy` for `key` (Redis key `redis_key`), having taken on the
    /// fleet's pause of the key that this process last heard of, if it still runs: Redis alone
    /// held it.
    fn fallback_for(
        &self,
        key: &BucketKey,
        redis_key: &str,
        policy: &Policy,
        processes: u32,
    ) -> Policy {
        let policy = share(policy, processes);
        // (Kept: it holds once Redis is back, should Redis have lost it.)
        let heard = lock(&self.heard).get(redis_key).copied();
        let now = Instant::now();
        if let Some(until) = heard.filter(|until| *until > now) {
            // A `Retry-After` to that end: the fallback pauses, its streak unmoved.
            let pause = Feedback::Pause {
                sent_at: now,
                received_at: now,
                resume_at: Some(until),
                throttled: false,
            };
            self.fallback.feedback_now(key, &policy, pause);
        }
        policy
    }

    fn note(&self, result: &Result<impl Sized, StoreError>) {
        match result {
            Err(e) if e.is_unreachable() => {
                if !self.out.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "redis unreachable: rate limiter {:?}", self.when_unreachable);
                }
            }
            // Reached, but not shared again: every decision fails until the credentials are
            // accepted (which the connection logs, measuring the clock again).
            Err(e) if e.is_auth_refused() => {
                if self.out.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "redis reachable again but refuses the credentials: rate limiter decisions fail"
                    );
                }
            }
            _ => {
                if self.out.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis reachable again: rate limiter shared again");
                    self.conn.recalibrate_soon();
                }
            }
        }
    }
}

impl RedisGcra {
    /// One decision for a request that has waited since `since` (`None`: it arrives now). With
    /// the fleet order and `place`, a refused request holds this process's place in the key's
    /// queue, scored by when it began waiting; without `place` (a request that fails rather
    /// than waits when refused) it takes none, and still waits behind those who hold one.
    fn asking(
        &self,
        key: &BucketKey,
        policy: &Policy,
        since: Option<Instant>,
        place: bool,
    ) -> GcraFuture<Decision> {
        let inner = Arc::clone(&self.inner);
        let redis_key = self.key_of(key);
        let key = key.clone();
        let policy = *policy;
        Box::pin(async move {
            // A pause Redis did not take holds here until it ends.
            if inner.paused_here.load(Ordering::Relaxed)
                && let Some(until) = inner.held_pause(&redis_key, Instant::now())
            {
                return Ok(Decision::NotBefore {
                    at: until,
                    cooldown: true,
                });
            }
            // So does the fleet's pause Redis told this process of, should Redis lose it.
            if let Some(until) = inner.heard_hold(&redis_key) {
                return Ok(Decision::NotBefore {
                    at: until,
                    cooldown: true,
                });
            }
            // Pauses kept while Redis was away reach it before anything is decided there (or
            // are on their way already: `deliver_first`).
            if inner.to_deliver.load(Ordering::Relaxed)
                && let Err(e) = inner.deliver_first().await
            {
                return inner.unreachable_decision(e, &key, &redis_key, &policy);
            }
            // Never decide on this process's own clock: the first decision of a lazy
            // connection waits for the offset to the server's.
            let now_us = inner.conn.calibrated_now_us().await;
            let now = Instant::now();
            let now_us = match now_us {
                Ok(now_us) => now_us,
                Err(e) => {
                    inner.note(&Err::<(), _>(e.clone()));
                    return inner.unreachable_decision(e, &key, &redis_key, &policy);
                }
            };
            let since = (inner.arrival_order && place)
                .then(|| since.map_or(now_us, |since| inner.conn.to_fleet(since, now, now_us)));
            let account_wide = key.request_kind().is_none();
            let counted = inner.count_requests && account_wide;
            // Numbered: if its answer is lost after the key admitted it, the key's next ask
            // from this process is given its cell rather than take a second one.
            let ask = Ask::start(&inner, &redis_key);
            // Before the script is sent: a 1302 reported here since makes its word stale.
            let asked = inner.throttles.load(Ordering::Relaxed);
            let result = inner
                .decide(
                    redis_key.clone(),
                    &policy,
                    now_us,
                    since,
                    counted,
                    Some(&ask),
                )
                .await;
            match result {
                Ok((FleetDecision::Admit, streak, at_ceiling, looked)) => {
                    ask.heard(looked);
                    if account_wide {
                        inner.saw_streak(&redis_key, streak);
                        if policy.adaptive.is_some() {
                            inner.saw_ceiling(&redis_key, &policy, at_ceiling, asked);
                        }
                    }
                    Ok(Decision::Admit)
                }
                Ok((FleetDecision::NotBefore { at_us, cooldown }, _, _, looked)) => {
                    ask.heard(looked);
                    let at = inner.conn.to_instant(at_us, now, now_us);
                    if cooldown {
                        inner.heard_pause(&redis_key, at);
                    }
                    Ok(Decision::NotBefore { at, cooldown })
                }
                Err(e) => {
                    // (An error Redis answered with ran nothing to replay.)
                    let unreachable = e.is_unreachable();
                    let decision = inner.unreachable_decision(e, &key, &redis_key, &policy);
                    if !unreachable {
                        ask.heard(Looked::Skipped);
                    } else if matches!(decision, Ok(Decision::Admit)) {
                        ask.used();
                    }
                    decision
                }
            }
        })
    }
}

impl RedisGcra {
    /// Reject mode's ask for a request of class key `class` (a class quota of account key
    /// `account`): both turns in one script, or neither ([`ACQUIRE_CLASS_BODY`]). It takes no
    /// place in either key's fleet queue, as [`Backend::acquire_or_refuse`]. A pause of either
    /// key that Redis did not take holds here first, the class's before the account's, as
    /// when each is asked apart; then one that Redis told this process of.
    ///
    /// It is not sent again when its answer is lost (a timeout after Redis ran it): that would
    /// take a second turn. Such an ask is answered as Redis being away ([`WhenUnreachable`]),
    /// and the turns it may have taken stay taken (unlike a single key's lost ask, whose cell
    /// the process's next ask for the key is given: see [`RedisGcra`]).
    fn asking_class(
        &self,
        class: &BucketKey,
        class_policy: &Policy,
        account: &BucketKey,
        account_policy: &Policy,
    ) -> GcraFuture<Decision> {
        let inner = Arc::clone(&self.inner);
        let (class_redis, account_redis) = (self.key_of(class), self.key_of(account));
        let (class, account) = (class.clone(), account.clone());
        let (class_policy, account_policy) = (*class_policy, *account_policy);
        Box::pin(async move {
            let unreachable = |inner: &Inner, e: StoreError| {
                inner.unreachable_class_decision(
                    e,
                    (&class, &class_redis, &class_policy),
                    (&account, &account_redis, &account_policy),
                )
            };
            if inner.paused_here.load(Ordering::Relaxed) {
                for redis_key in [&class_redis, &account_redis] {
                    if let Some(until) = inner.held_pause(redis_key, Instant::now()) {
                        return Ok(Decision::NotBefore {
                            at: until,
                            cooldown: true,
                        });
                    }
                }
            }
            // So does the fleet's pause Redis told this process of, should Redis lose it.
            for redis_key in [&class_redis, &account_redis] {
                if let Some(until) = inner.heard_hold(redis_key) {
                    return Ok(Decision::NotBefore {
                        at: until,
                        cooldown: true,
                    });
                }
            }
            if inner.to_deliver.load(Ordering::Relaxed)
                && let Err(e) = inner.deliver_first().await
            {
                return unreachable(&inner, e);
            }
            let asked = inner.throttles.load(Ordering::Relaxed);
            let now_us = inner.conn.calibrated_now_us().await;
            let now = Instant::now();
            let now_us = match now_us {
                Ok(now_us) => now_us,
                Err(e) => {
                    inner.note(&Err::<(), _>(e.clone()));
                    return unreachable(&inner, e);
                }
            };
            let account_wide = account.request_kind().is_none();
            let counted = inner.count_requests && account_wide;
            let result = inner
                .decide_class(
                    (class_redis.clone(), &class_policy),
                    (account_redis.clone(), &account_policy),
                    now_us,
                    counted,
                )
                .await;
            match result {
                Ok((FleetDecision::Admit, streak, at_ceiling, _)) => {
                    if account_wide {
                        inner.saw_streak(&account_redis, streak);
                        if account_policy.adaptive.is_some() {
                            inner.saw_ceiling(&account_redis, &account_policy, at_ceiling, asked);
                        }
                    }
                    Ok(Decision::Admit)
                }
                Ok((FleetDecision::NotBefore { at_us, cooldown }, _, _, by_account)) => {
                    let at = inner.conn.to_instant(at_us, now, now_us);
                    if cooldown {
                        let redis_key = if by_account {
                            &account_redis
                        } else {
                            &class_redis
                        };
                        inner.heard_pause(redis_key, at);
                    }
                    Ok(Decision::NotBefore { at, cooldown })
                }
                Err(e) => unreachable(&inner, e),
            }
        })
    }
}

impl Backend for RedisGcra {
    type AcquireFuture = GcraFuture<Decision>;
    type FeedbackFuture = GcraFuture<Reported>;

    /// [`RedisGcra::fleet_requests`] for an account-wide key (a class key's requests are
    /// counted under its account's).
    fn fleet_requests(&self, key: &BucketKey) -> Option<FleetRequests> {
        if key.request_kind().is_some() || !self.inner.count_requests {
            return None;
        }
        let this = self.clone();
        let account = key.account_id().cloned();
        Some(Box::pin(async move {
            this.fleet_requests(account.as_ref())
                .await
                .map_err(StoreError::into_ratelimit)
        }))
    }

    /// A request's first ask: refused, it holds this process's place in the key's fleet queue
    /// from now (the layer waits, or says it stopped: [`Backend::stop_waiting`]).
    fn acquire(&self, key: &BucketKey, policy: &Policy) -> Self::AcquireFuture {
        self.asking(key, policy, None, true)
    }

    /// A request that fails when refused (reject mode): it takes no place in the key's fleet
    /// queue, which nobody would give up.
    fn acquire_or_refuse(
        &self,
        key: &BucketKey,
        policy: &Policy,
        _decided_at: &mut Option<Instant>,
    ) -> Self::AcquireFuture {
        self.asking(key, policy, None, false)
    }

    fn acquire_waiting(
        &self,
        key: &BucketKey,
        policy: &Policy,
        since: Instant,
    ) -> Self::AcquireFuture {
        self.asking(key, policy, Some(since), true)
    }

    /// Reject mode's class request: the class key's turn and the account key's in one script,
    /// both or neither, so a request its account refuses spends no class turn. Takes no place
    /// in either key's fleet queue, as [`acquire_or_refuse`](Backend::acquire_or_refuse).
    fn acquire_class_or_refuse(
        &self,
        class: &BucketKey,
        class_policy: &Policy,
        account: &BucketKey,
        account_policy: &Policy,
        _decided_at: &mut Option<Instant>,
    ) -> Option<Self::AcquireFuture> {
        Some(self.asking_class(class, class_policy, account, account_policy))
    }

    /// Gives this process's place in the key's queue up now (sent on the runtime; a place that
    /// is not left ends by its TTL anyway).
    fn stop_waiting(&self, key: &BucketKey) {
        if !self.inner.arrival_order {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = Arc::clone(&self.inner);
        let keys = queue_keys(&self.key_of(key));
        handle.spawn(async move {
            let args = [inner.instance.clone()];
            let result: Result<i64, StoreError> = inner.conn.run(&inner.leave, &keys, &args).await;
            if let Err(error) = result {
                tracing::debug!(%error, "could not leave a rate queue in redis; its place will end by itself");
            }
        });
    }

    /// The report runs on a task of the runtime (when there is one), which the returned
    /// future waits for: a caller that gives up on it (a timeout around the call, a
    /// `select!`) does not cancel the report, so a 1302's pause still reaches the fleet, or is
    /// kept for delivery, and reports kept earlier are still delivered ahead of it.
    fn feedback(
        &self,
        key: &BucketKey,
        policy: &Policy,
        feedback: Feedback,
    ) -> Self::FeedbackFuture {
        let inner = Arc::clone(&self.inner);
        let redis_key = self.key_of(key);
        let key = key.clone();
        let policy = *policy;
        // A pause is numbered from its first attempt: if that attempt's answer is lost after
        // Redis ran it, the copy kept for delivery is skipped by its number.
        let number =
            matches!(feedback, Feedback::Pause { .. }).then(|| FirstAttempt::start(&inner));
        // A 1302 lowers the rate: this process reports its successes from now, whether or
        // not Redis takes the report (a later admission's reply says when the key is back
        // at its ceiling), and an admission's reply from before it says nothing of it.
        // (Both here, not on the task: at once, as the response comes.)
        let throttled = matches!(
            feedback,
            Feedback::Pause {
                throttled: true,
                ..
            }
        );
        if throttled {
            inner.throttled_here(&redis_key);
        }
        let report = async move {
            let n = number.as_ref().map(|first| first.n);
            // Pauses kept while Redis was away go first, in order.
            let sent = if inner.to_deliver.load(Ordering::Relaxed) {
                inner.deliver_first().await
            } else {
                Ok(())
            };
            let result = match sent {
                Ok(()) => {
                    let retry_after = retry_after_of(&feedback);
                    inner
                        .send_feedback(&redis_key, &policy, feedback, retry_after, n)
                        .await
                }
                Err(e) => Err(e),
            };
            // (Kept, if it is, before its first attempt ends: the key's set of numbers taken
            // is never trimmed past it.)
            let reported =
                result.or_else(|e| inner.not_taken(e, &key, redis_key, &policy, feedback, n));
            drop(number);
            reported
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Box::pin(report);
        };
        let task = handle.spawn(report);
        Box::pin(async move {
            match task.await {
                Ok(reported) => reported,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // The runtime is shutting down.
                Err(e) => Err(BackendError::unreachable(format!("rate report lost: {e}"))),
            }
        })
    }

    /// Whether this process's last admission under `key` (account-wide) was told the key's
    /// 1302 streak is running, and no report since said it ended: the layer then reports
    /// successes, so a streak another process started is reset by this process's success.
    fn streak_running(&self, key: &BucketKey) -> bool {
        if key.request_kind().is_some() || !self.inner.any_streak.load(Ordering::Relaxed) {
            return false;
        }
        lock(&self.inner.streaks).contains(&self.key_of(key))
    }

    /// Whether the last admission (or report) under the account-wide `key` here said its
    /// adaptive rate is at `policy`'s ceiling where a success changes nothing in Redis (no
    /// 1302 since the last success, no caution it would end): the layer then reports none, and
    /// an adaptive key at its ceiling costs one script a request, as a fixed quota does. Below
    /// the ceiling (after a 1302, or in slow start) every success is reported, until a
    /// report's reply says the rate is back at the ceiling. A 1302 another process reports is
    /// learned at this process's next admission, whose reply takes the key off its ceiling
    /// here: only the successes of
    /// requests admitted before the 1302 reached Redis go unreported meanwhile (most were
    /// sent before the pause began, and Redis would leave the rate alone for those anyway). A
    /// 1302 this process reports takes the key off its ceiling here at once. A rate above the
    /// ceiling (lowered since, and capped at the key's next decision) is not at it, and while
    /// Redis is away no key is: the fallback decides then, and its own rate counts every
    /// success.
    fn adaptive_at_ceiling(&self, key: &BucketKey, policy: &Policy) -> bool {
        if key.request_kind().is_some()
            || policy.adaptive.is_none()
            || !self.inner.any_at_ceiling.load(Ordering::Relaxed)
            // Redis away: the fallback decides, and its own rate counts every success.
            || self.inner.out.load(Ordering::Relaxed)
        {
            return false;
        }
        let ceiling = policy.quota.rate_per_second().to_bits();
        lock(&self.inner.at_ceiling).get(&self.key_of(key)) == Some(&ceiling)
    }
}

#[cfg(test)]
mod tests {
    use kling_ratelimit::{Cooldown, Quota};

    use super::*;

    /// The fallback's share of an hours-long interval among many processes is a quota the
    /// in-process limiter keeps (it was scaled past the longest interval, an invalid quota
    /// whose period the limiter then read as another).
    #[test]
    fn the_fallbacks_share_of_a_slow_quota_is_valid() {
        let slow = Quota::with_period(Duration::from_secs(10 * 3600)).with_burst(3);
        let policy = Policy::new(slow, Cooldown::default());
        let shared = share(&policy, 100);
        assert!(shared.quota.validate().is_ok(), "{:?}", shared.quota);
        assert!(shared.quota.period() > slow.period());
        assert_eq!(share(&policy, 1).quota, slow);
    }

    fn pause(redis_key: &str, resume_at: Instant, throttled: bool) -> Report {
        let now = Instant::now();
        pause_received(redis_key, now, Some(resume_at), throttled)
    }

    /// A pause of `redis_key` whose answer arrived at `received_at`.
    fn pause_received(
        redis_key: &str,
        received_at: Instant,
        resume_at: Option<Instant>,
        throttled: bool,
    ) -> Report {
        let feedback = Feedback::Pause {
            sent_at: received_at,
            received_at,
            resume_at,
            throttled,
        };
        Report {
            redis_key: redis_key.to_owned(),
            policy: Policy::new(Quota::per_second(1.0), Cooldown::default()),
            feedback,
            retry_after: retry_after_of(&feedback),
            n: 0,
        }
    }

    /// A merge keeps, for the fleet's caution, the `Retry-After` of the 1302 whose times it
    /// carries, while its pause lasts to the latest end: a bare 1302 merged with a later
    /// answer's long `Retry-After`, or with the escalated pause this process holds, still
    /// reads as a bare one (`k` = 1), and a 1302's 6 s wait stays 6 s.
    #[test]
    fn a_merged_1302_keeps_its_own_retry_after_for_the_caution() {
        let start = Instant::now();
        let secs = Duration::from_secs;
        let bare = pause_received("a", start, None, true);
        let held = start + secs(30);
        // A maintenance page's 120 s (not a 1302) after it.
        let page = pause_received("a", start + secs(1), Some(start + secs(121)), false);
        let mut merged = bare.clone();
        merged.merge(&page, Some(held));
        assert_eq!(resume_at(&merged), Some(start + secs(121)));
        assert_eq!(merged.retry_after, None, "a bare 1302");
        // The process's escalated pause alone.
        let mut merged = bare.clone();
        merged.merge(&pause_received("a", start, None, false), Some(held));
        assert_eq!(resume_at(&merged), Some(held));
        assert_eq!(merged.retry_after, None, "a bare 1302");
        // A later bare 1302: its times and its (absent) `Retry-After`.
        let six = pause_received("a", start, Some(start + secs(6)), true);
        let mut merged = six.clone();
        merged.merge(
            &pause_received("a", start + secs(2), None, true),
            Some(held),
        );
        assert_eq!(merged.retry_after, None, "the later, bare 1302");
        // A 1302's own 6 s, whatever came after.
        let mut merged = six.clone();
        merged.merge(&page, Some(held));
        assert_eq!(merged.retry_after, Some(secs(6)));
        // Past the bound, by `keep`: the same.
        let mut kept = Undelivered::default();
        keep(&mut kept, bare);
        kept.paused.insert("a".to_owned(), held);
        for _ in 1..MAX_UNDELIVERED {
            keep(&mut kept, pause("b", start + secs(10), false));
        }
        keep(&mut kept, page);
        assert_eq!(kept.pending.len(), MAX_UNDELIVERED);
        assert_eq!(kept.pending[0].redis_key, "a");
        assert_eq!(resume_at(&kept.pending[0]), Some(start + secs(121)));
        assert_eq!(kept.pending[0].retry_after, None, "a bare 1302");
    }

    /// A 1302 sent before an earlier one arrived (a request in flight as the pause began) is
    /// not counted, in process nor by the script after the earlier: merged after it, it
    /// leaves the counted one's times and `Retry-After`, so the fleet's caution is the one in
    /// process (60 s, not a bare 1302's 1). One sent after it arrived is counted: its own.
    #[test]
    fn a_merged_1302_sent_before_the_pause_began_leaves_the_counted_ones_caution() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let throttled = |sent: u64, received: u64, wait: Option<u64>| {
            let received_at = start + ms(received);
            let feedback = Feedback::Pause {
                sent_at: start + ms(sent),
                received_at,
                resume_at: wait.map(|wait| received_at + ms(wait)),
                throttled: true,
            };
            Report {
                redis_key: "a".to_owned(),
                policy: Policy::new(Quota::per_second(1.0), Cooldown::default()),
                feedback,
                retry_after: retry_after_of(&feedback),
                n: 0,
            }
        };
        let counted = throttled(0, 100, Some(60_000));
        let mut merged = counted.clone();
        merged.merge(&throttled(50, 200, None), None);
        assert_eq!(merged.retry_after, Some(ms(60_000)));
        assert!(matches!(
            merged.feedback,
            Feedback::Pause { sent_at, received_at, throttled: true, .. }
                if sent_at == start && received_at == start + ms(100)
        ));
        assert_eq!(resume_at(&merged), Some(start + ms(60_100)));
        let mut merged = counted.clone();
        merged.merge(&throttled(100, 300, None), None);
        assert_eq!(
            merged.retry_after, None,
            "sent after the pause began: counted"
        );
        assert_eq!(resume_at(&merged), Some(start + ms(60_100)));
    }

    /// Keeps `report` in `kept` under the next number, as a first attempt that timed out does.
    fn keep(kept: &mut Undelivered, mut report: Report) {
        report.n = kept.number();
        kept.in_flight.remove(&report.n);
        kept.keep(report);
    }

    fn resume_at(report: &Report) -> Option<Instant> {
        match report.feedback {
            Feedback::Pause { resume_at, .. } => resume_at,
            _ => None,
        }
    }

    /// Past the bound, a report of a key with none kept merges the other keys' reports into
    /// one each (the latest end, a 1302 if any was), but the one a delivery is sending: no
    /// key's pause is dropped.
    #[test]
    fn past_the_bound_a_new_keys_pause_merges_each_keys_rather_than_dropping_one() {
        let start = Instant::now();
        let mut kept = Undelivered::default();
        for i in 0..MAX_UNDELIVERED {
            let key = if i < 24 { "b" } else { "a" };
            let end = start + Duration::from_secs(10 + i as u64);
            keep(&mut kept, pause(key, end, i == 30));
        }
        kept.sending = Some(0);
        let last = start + Duration::from_secs(10 + MAX_UNDELIVERED as u64 - 1);
        keep(&mut kept, pause("c", start, false));
        let keys: Vec<&str> = kept.pending.iter().map(|r| r.redis_key.as_str()).collect();
        // The one being sent (b's first), b's others, a's, and c's.
        assert_eq!(keys, ["b", "b", "a", "c"]);
        assert_eq!(
            resume_at(&kept.pending[0]),
            Some(start + Duration::from_secs(10))
        );
        assert_eq!(
            resume_at(&kept.pending[1]),
            Some(start + Duration::from_secs(33))
        );
        assert_eq!(resume_at(&kept.pending[2]), Some(last));
        assert!(matches!(
            kept.pending[2].feedback,
            Feedback::Pause {
                throttled: true,
                ..
            }
        ));
        // Sent: off the queue, by its number.
        kept.sent(0);
        assert_eq!(kept.pending.len(), 3);
    }

    /// While Redis is away, under [`WhenUnreachable::Fallback`], reject mode's class request
    /// is decided in process with both turns or neither: one its account refuses leaves the
    /// class's turn.
    #[tokio::test]
    async fn away_a_class_request_its_account_refuses_spends_no_class_turn_in_the_fallback() {
        let conn = Connection::lazy(crate::RedisConfig::new("redis://127.0.0.1:1/")).unwrap();
        let gcra = RedisGcra::new(conn).when_unreachable(WhenUnreachable::fallback(1));
        let policy = Policy::new(Quota::per_second(1.0), Cooldown::default());
        let account = BucketKey::account(None);
        let class = BucketKey::class(None, kling_core::RequestKind::Account);
        assert_eq!(
            gcra.acquire(&account, &policy).await.unwrap(),
            Decision::Admit
        );
        let both = gcra
            .acquire_class_or_refuse(&class, &policy, &account, &policy, &mut None)
            .expect("decided in one step");
        assert!(matches!(both.await.unwrap(), Decision::NotBefore { .. }));
        assert!(gcra.is_out());
        assert_eq!(
            gcra.acquire(&class, &policy).await.unwrap(),
            Decision::Admit
        );
    }

    /// A pause Redis told of holds each decision of its key until it ends, without asking
    /// Redis (here, one that cannot be reached, in `Fail` mode: asked, it would fail), a
    /// class request's by its account's too; and the summary that spares the usual decision
    /// a lock (`heard_until`) stays in step with the pauses heard of: a pause of another key
    /// ending sooner does not lower it, it holds while any pause runs, and once the last one
    /// ended, a decision sets it back to nothing, until another pause is heard of.
    #[tokio::test(start_paused = true)]
    async fn a_pause_heard_of_holds_its_key_until_it_ends_and_then_costs_one_load() {
        let conn = Connection::lazy(crate::RedisConfig::new("redis://127.0.0.1:1/")).unwrap();
        let gcra = RedisGcra::new(conn).when_unreachable(WhenUnreachable::Fail);
        let inner = &gcra.inner;
        let policy = Policy::new(Quota::per_second(1.0), Cooldown::default());
        let (a, b) = (
            BucketKey::account(Some(AccountId::new("a"))),
            BucketKey::account(Some(AccountId::new("b"))),
        );
        let class = BucketKey::class(Some(AccountId::new("a")), kling_core::RequestKind::Account);
        let (a_key, b_key) = (gcra.key_of(&a), gcra.key_of(&b));
        let now = Instant::now();
        assert_eq!(inner.heard_hold(&a_key), None);
        assert_eq!(inner.heard_until.load(Ordering::Relaxed), 0);
        inner.heard_pause(&a_key, now + Duration::from_secs(10));
        inner.heard_pause(&b_key, now + Duration::from_secs(2));
        let held = |at: Instant| Decision::NotBefore { at, cooldown: true };
        assert_eq!(
            gcra.acquire(&a, &policy).await.unwrap(),
            held(now + Duration::from_secs(10))
        );
        assert_eq!(
            gcra.acquire(&b, &policy).await.unwrap(),
            held(now + Duration::from_secs(2))
        );
        let both = gcra
            .acquire_class_or_refuse(&class, &policy, &a, &policy, &mut None)
            .expect("decided in one step");
        assert_eq!(both.await.unwrap(), held(now + Duration::from_secs(10)));

        tokio::time::advance(Duration::from_secs(2)).await;
        // `b`'s ended: asked, Redis cannot be reached. `a`'s still holds.
        assert!(gcra.acquire(&b, &policy).await.is_err());
        assert_ne!(inner.heard_until.load(Ordering::Relaxed), 0);
        assert_eq!(
            gcra.acquire(&a, &policy).await.unwrap(),
            held(now + Duration::from_secs(10))
        );
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(gcra.acquire(&a, &policy).await.is_err());
        assert_eq!(inner.heard_until.load(Ordering::Relaxed), 0);
        assert_eq!(inner.heard_hold(&b_key), None);

        // Heard of again (after the reset), and longer than the one heard before.
        let later = Instant::now() + Duration::from_secs(5);
        inner.heard_pause(&b_key, later);
        inner.heard_pause(&b_key, later - Duration::from_secs(1));
        assert_eq!(gcra.acquire(&b, &policy).await.unwrap(), held(later));
        assert!(gcra.acquire(&a, &policy).await.is_err());
    }

    /// A key's asks are numbered one after the other; one that ends without its answer is
    /// lost and carried by the key's next asks (the lowest unheard number with it) until an
    /// answer settles it; once the key has none left, its numbering starts afresh past every
    /// number it used (numbers never repeat: the key's record names asks by them).
    #[tokio::test]
    async fn asks_are_numbered_without_repeats_and_lost_ones_carried_until_settled() {
        let conn = Connection::lazy(crate::RedisConfig::new("redis://127.0.0.1:1/")).unwrap();
        let gcra = RedisGcra::new(conn);
        let inner = &*gcra.inner;
        let (first, second) = (Ask::start(inner, "k"), Ask::start(inner, "k"));
        assert_eq!((first.n, second.n, second.floor), (0, 1, 0));
        drop(first);
        // A request admitted by the fallback after a lost answer: not carried.
        second.used();
        let third = Ask::start(inner, "k");
        assert_eq!(
            (third.n, third.floor, third.lost.as_slice()),
            (2, 0, &[0][..])
        );
        drop(third);
        let fourth = Ask::start(inner, "k");
        assert_eq!(fourth.lost, [0, 2]);
        fourth.heard(Looked::Redeemed(2));
        let fifth = Ask::start(inner, "k");
        assert_eq!(
            (fifth.n, fifth.floor, fifth.lost.as_slice()),
            (4, 0, &[0][..])
        );
        fifth.heard(Looked::NoneAdmitted);
        assert!(lock(&inner.asks).is_empty(), "nothing left of the key");
        let afresh = Ask::start(inner, "k");
        assert!(afresh.n > 4, "{}", afresh.n);
        assert!(afresh.lost.is_empty());
        afresh.heard(Looked::Skipped);
    }

    /// A delivery that failed for want of Redis (a timeout among them: Redis may have run
    /// the report) leaves the report marked as sent, so that no later report is merged into
    /// it: Redis, having taken its number, would skip what was merged in with it.
    #[tokio::test]
    async fn a_report_whose_delivery_failed_is_not_merged_into() {
        let conn = Connection::lazy(crate::RedisConfig::new("redis://127.0.0.1:1/")).unwrap();
        let gcra = RedisGcra::new(conn);
        let start = Instant::now();
        keep(&mut lock(&gcra.inner.undelivered), pause("a", start, true));
        assert!(gcra.inner.deliver().await.is_err());
        let mut kept = lock(&gcra.inner.undelivered);
        assert_eq!(kept.sending, Some(0));
        for i in 1..=MAX_UNDELIVERED {
            keep(
                &mut kept,
                pause("a", start + Duration::from_secs(i as u64), false),
            );
        }
        assert_eq!(kept.pending[0].n, 0);
        assert_eq!(resume_at(&kept.pending[0]), Some(start));
    }
}
