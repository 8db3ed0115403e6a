//! The Lua both backends' acquire scripts share to keep a fleet queue: who is ahead.
//!
//! A queue is two sorted sets over the same members (one per waiting process or create):
//! `q` by arrival (µs of fleet time), `qx` by the end of each place (µs). A place ends when its
//! holder stops asking; its holder renews it with every ask.

/// Defines `ahead_of(q, qx, me, since, now)`: drops the places that ended by `now`, then returns
/// the end of the place of the first in line when it arrived before `me` (at `since`; ties go
/// to the smaller member), else `nil`.
pub(crate) const AHEAD_OF: &str = r"
local function ahead_of(q, qx, me, since, now)
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', qx, '-inf', string.format('%.0f', now))) do
    redis.call('ZREM', q, gone)
    redis.call('ZREM', qx, gone)
  end
  local first = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
  if not first[1] or first[1] == me then return nil end
  local theirs = tonumber(first[2])
  if theirs > since or (theirs == since and first[1] >= me) then return nil end
  local ends = redis.call('ZSCORE', qx, first[1])
  if ends then return tonumber(ends) end
  return nil
end
";
