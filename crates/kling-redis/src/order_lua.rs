//! The Lua both backends' acquire scripts share to keep a fleet queue.
//!
//! A queue is two sorted sets over the same members (one per waiting process or create):
//! `q` by arrival (µs of fleet time), `qx` by the end of each place (µs). A place ends when its
//! holder stops asking; its holder renews it with every ask.

/// Defines the queue's three operations:
/// - `ahead_of(q, qx, me, since, now)`: drops the places that ended by `now`, moves `me`'s
///   place (if it holds one) to `since` (its current head's arrival), then returns the end of
///   the place of the first in line when it arrived before `me` (at `since`; ties go to the
///   smaller member), else `nil`;
/// - `take_place(q, qx, me, since, ends, now)`: `me` holds a place, arrived at `since`, until
///   `ends`; both sets expire a second after the last place ends, should nobody ask again;
/// - `leave_place(q, qx, me)`: `me` gives its place up; true if it held one.
pub(crate) const QUEUE: &str = r"
local function ahead_of(q, qx, me, since, now)
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', qx, '-inf', string.format('%.0f', now))) do
    redis.call('ZREM', q, gone)
    redis.call('ZREM', qx, gone)
  end
  -- A place is ranked by its holder's current head: a process whose head gave up while
  -- another of its requests waits must not pass the earlier head's arrival on to it.
  if me ~= '' then redis.call('ZADD', q, 'XX', string.format('%.0f', since), me) end
  local first = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
  if not first[1] or first[1] == me then return nil end
  local theirs = tonumber(first[2])
  if theirs > since or (theirs == since and first[1] >= me) then return nil end
  local ends = redis.call('ZSCORE', qx, first[1])
  if ends then return tonumber(ends) end
  return nil
end
local function take_place(q, qx, me, since, ends, now)
  redis.call('ZADD', q, since, me)
  redis.call('ZADD', qx, string.format('%.0f', ends), me)
  local last = redis.call('ZRANGE', qx, -1, -1, 'WITHSCORES')
  local ms = math.ceil((tonumber(last[2]) - now) / 1000) + 1000
  redis.call('PEXPIRE', q, ms)
  redis.call('PEXPIRE', qx, ms)
end
local function leave_place(q, qx, me)
  if redis.call('ZREM', q, me) == 0 then return false end
  redis.call('ZREM', qx, me)
  return true
end
";
