//! The Lua scripts of [`RedisSlots`](crate::RedisSlots).
//!
//! Layout under the prefix `P`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:pool:ACCOUNT:POOL:h` | hash | holding id → `{w, s, k, id, ext, p, a}` (weight, since, `g` grant or `t` task, task id, external id, create path: kling-concurrency's `CreatePath` number in decimal (an adopted task's: the path it was listed on), absent when not known; `a` true for a task a reconcile adopted) |
//! | `P:pool:ACCOUNT:POOL:l` | sorted set | holding id by lease deadline (µs) |
//! | `P:pool:ACCOUNT:POOL:m` | hash | `used`, `hid` (hidden after a 1303), `rec` (last recovery), `lvl` (slots in use at the last 1303, the refused create's included; 0 once a create succeeded there), `lvlat` (when the last 1303 that was no part of a burst came, µs), `stk` (1303s in a row at or below `lvl`: the recovery interval is doubled that many times, and ended tasks bring no hidden slot back), `acct`, `pool` |
//! | `P:pool:ACCOUNT:POOL:q` | sorted set | the fleet's queue: each waiting process's head create by arrival (µs) |
//! | `P:pool:ACCOUNT:POOL:qx` | sorted set | the same creates by the end of their place (µs): a process that stops asking loses it |
//! | `P:ids` | hash | task id → `pool key \n holding id` |
//! | `P:ext` | hash | external id within its account (`LEN.ACCOUNT` then the external id: external ids are unique per account only) → `pool key \n holding id` (the latest holding filed under it) |
//! | `P:xs:FIELD` | set | while two or more live holdings carry one `P:ext` field (external ids may be unique per create path only: a video and an image under `job-7`), every one's `pool key \n holding id` |
//! | `P:pools` | set | every pool key |
//! | `P:cap` | hash | capacity set at run time: `ACCOUNT|POOL` or `*|POOL` → slots |
//! | `P:halt:ACCOUNT` | string | the 1102 that halted the account (`status \n envelope`) |
//! | `P:stamps` | hash | `h:` halt key or `c:` capacity field → when the latest halt, reset or capacity applied to it was made (fleet time, µs): a replayed one made before is dropped (one field per account halted or reset and per capacity field set, both the user's: no request data adds one; never expired) |
//! | `P:alive` | string | present while Redis keeps its state; value: the generation, which is the end of the re-registration grace (µs) that started it |
//! | `P:seq` | string | the sequence: each script's number (see `PRELUDE`) |
//! | `P:run` | string | the `run_id` of the server that wrote the generation: another one (a restart, which may load an older snapshot; a failover to a replica, which may lag) starts a new generation |
//! | `P:ended` | sorted set | tasks reported ended (`i:` task id; `x:` an external id, as its `P:ext` field) by expiry (µs, the configured lease on, at least the default 30 min): a holding of one is not created again (a re-registration, a replayed hold); `e:` the `P:ext` field of a text `complete` told before any holding had it, filed as both `i:` and `x:` until one matches (the other is then dropped); `p:` task id `\n` `P:ext` field: an end a report told with its external id before any holding had either, filed as `i:` and `z:` (the external id, as `x:`, but freeing only a holding whose task id is unknown: one known by another task id is another task) too, and the `z:` dropped when the `i:` frees a holding; an `x:` or `z:` frees one holding and is dropped; `h:` a holding a report released by its external id (its hold, replayed, holds nothing; a `complete` by its external id also notes its task id, if known, as `i:`); `c:` the text an end was told by: that end was counted in the finished-task metrics, so such a holding given back is not counted again; at most [`ENDED_KEPT`] entries, the first to expire evicted first |
//! | `P:done` | sorted set | the ids of changes that must take effect once (`cap`, `cong`, `halt`, `unhalt`, `hold`, an `upd` with an end) by expiry (µs, as `P:ended`'s, at most as many): a replay of one Redis ran is skipped |
//! | `P:rel:ID` | string | the tasks the change `ID` released (JSON, as `APPLY` returns them), while `P:done` keeps the id: a skipped replay answers with them |
//! | channel `P:freed` | pub/sub | a pool key (or `*`) whenever slots may have freed |
//! | channel `P:halted` | pub/sub | a halt set (`halt`, or `rehalt` where the key was gone): the generation, `\n`, the halt key, `\n`, the halt |
//! | channel `P:unhalted` | pub/sub | a reset: the halt key, `\n`, the halt it deleted |
//!
//! Times are integer microseconds of fleet time (see [`Connection`](crate::Connection)),
//! written with `%.0f` (Lua's own conversion keeps 14 digits only).

use std::time::Duration;

use crate::order_lua::QUEUE;

/// Shared by every slots script. `ARGV[1]` prefix, `ARGV[2]` now, `ARGV[3]` grace (µs). `lost`
/// is the store's generation (the `P:alive` value) and the script's number, as
/// `generation:number`: a process that sees the generation change knows Redis lost its state,
/// and one that gets a number no greater than one it saw before sending knows the state went
/// back (and asks for a new generation with `newgen`).
const PRELUDE: &str = r"
local P = ARGV[1]
local now = tonumber(ARGV[2])
local IDS = P .. ':ids'
local EXT = P .. ':ext'
local function int(x) return string.format('%.0f', x) end
local grace_until = 0
do
  local g = redis.call('GET', P .. ':alive')
  -- The server's identity is read by the maintenance passes only (`INFO` costs more than the
  -- rest of a script); between them the sequence below catches a store that went back.
  local run = ''
  if ARGV[4] == 'alive' or ARGV[4] == 'init' or ARGV[4] == 'newgen' then
    local ok, info = pcall(redis.call, 'INFO', 'server')
    if ok then run = string.match(info, 'run_id:(%x+)') or '' end
  end
  -- A missing generation always starts a grace, a process's first script (`init`) included:
  -- an empty store looks the same whether it is new or lost its state. So does a generation
  -- another server wrote: a restart (an RDB or AOF snapshot may be older than the state the
  -- fleet saw) or a failover (a replica may lag), which brought the state back older.
  if not g or (run ~= '' and redis.call('GET', P .. ':run') ~= run) then
    -- An ordinary script that starts the generation notes the server too, else the next
    -- maintenance pass would take the generation for another server's and start one more.
    if run == '' then
      local ok, info = pcall(redis.call, 'INFO', 'server')
      if ok then run = string.match(info, 'run_id:(%x+)') or '' end
    end
    grace_until = now + tonumber(ARGV[3])
    if g and tonumber(g) == grace_until then grace_until = grace_until + 1 end
    redis.call('SET', P .. ':alive', int(grace_until))
    if run ~= '' then redis.call('SET', P .. ':run', run) end
  else
    grace_until = tonumber(g)
  end
end
-- The store's generation (a new one after every loss of state) and its sequence: every
-- script takes the next number, so a process that gets one no greater than one it saw
-- before it sent this script knows the store went back to an older state.
local seq = redis.call('INCR', P .. ':seq')
local lost = int(grace_until) .. ':' .. seq
local released = {}
-- An external id's field in EXT: within its account (external ids are unique per account
-- only), the account's length first so no two pairs share a field.
local function xf(acct, ext) return #acct .. '.' .. acct .. ext end
-- A place (`pool key \n holding id`) split in two, at its last newline: a holding id has
-- none, but an account's or a pool's name in the pool key may.
local function split(place)
  return string.match(place, '^(.*)\n(.-)$')
end
-- Whether a holding of create path `a` may be a task a report of create path `b` names
-- (nil: not known, either).
local function may_be(a, b) return a == nil or b == nil or a == b end
-- External ids may be unique per create path only (a legacy task is looked up at
-- `{create path}/{external id}`), so one account may hold two tasks under one: EXT names the
-- latest place filed under a field, and while two or more live holdings carry it, the set
-- `P:xs:FIELD` names them all.
local function xkey(f) return P .. ':xs:' .. f end
-- The live holdings filed under the EXT field `f`: {place, pk, h, rec} each.
local function xlive(f)
  local places
  if redis.call('EXISTS', xkey(f)) == 1 then
    places = redis.call('SMEMBERS', xkey(f))
  else
    places = {redis.call('HGET', EXT, f)}
    if not places[1] then return {} end
  end
  local out = {}
  for _, place in ipairs(places) do
    local pk, h = split(place)
    local raw = redis.call('HGET', pk .. ':h', h)
    if raw then
      local rec = cjson.decode(raw)
      if rec.ext then table.insert(out, {place = place, pk = pk, h = h, rec = rec}) end
    end
  end
  return out
end
-- Files the live places under `f` but `drop`, then `add` (if any), the last one in EXT.
local function xfile(f, drop, add)
  local keep = {}
  for _, x in ipairs(xlive(f)) do
    if x.place ~= drop and x.place ~= add then table.insert(keep, x.place) end
  end
  if add then table.insert(keep, add) end
  redis.call('DEL', xkey(f))
  if #keep == 0 then
    redis.call('HDEL', EXT, f)
    return
  end
  redis.call('HSET', EXT, f, keep[#keep])
  if #keep > 1 then redis.call('SADD', xkey(f), unpack(keep)) end
end
local function xdel(f, place) xfile(f, place, nil) end
-- The product of the pool whose key is `pk` (`video` of `video:kling-3.0`), as its meta
-- hash names the pool.
local function product_of(pk)
  return string.match(redis.call('HGET', pk .. ':m', 'pool') or '', '^[^:]*')
end
-- The one live holding of account `acct` under the external id `ext` that a report of a task
-- created on `path` may name: one whose task id is unknown (a create of unknown outcome), or
-- (`any`, `complete`'s text) any, of that path where both are known, and of `product` if
-- given (a reconcile's listed task: another product's create is another create path's).
-- When two could be the one (creates on two paths), it names neither.
local function by_external(acct, path, ext, any, product)
  local found = nil
  for _, x in ipairs(xlive(xf(acct, ext))) do
    if (any or not x.rec.id) and may_be(x.rec.p, path)
        and (not product or product_of(x.pk) == product) then
      if found then return nil end
      found = x
    end
  end
  return found
end
-- Adds a released holding to the script's answer: account, pool, task (id or external id),
-- weight, since, reason, holding id.
local function push_released(acct, pool, task, w, since, reason, h)
  table.insert(released, acct)
  table.insert(released, pool)
  table.insert(released, task)
  table.insert(released, w)
  table.insert(released, since)
  table.insert(released, reason)
  table.insert(released, h)
end
-- `unmade`: a create that never happened (a lookup found no task), no task's end: its slots
-- go back, but it brings no hidden slot back.
local function release(pk, h, rec, reason, unmade)
  redis.call('HDEL', pk .. ':h', h)
  redis.call('ZREM', pk .. ':l', h)
  local m = pk .. ':m'
  local used = redis.call('HINCRBY', m, 'used', -rec.w)
  if used < 0 then redis.call('HSET', m, 'used', 0) end
  local place = pk .. '\n' .. h
  if rec.id and redis.call('HGET', IDS, rec.id) == place then redis.call('HDEL', IDS, rec.id) end
  if rec.ext then xdel(xf(redis.call('HGET', m, 'acct') or '', rec.ext), place) end
  if reason then
    -- An ended task brings one hidden slot back, unless 1303s in a row said they do not.
    local v = redis.call('HMGET', m, 'hid', 'stk')
    local hidden = tonumber(v[1] or '0')
    if not unmade and hidden > 0 and tonumber(v[2] or '0') == 0 then
      redis.call('HSET', m, 'hid', hidden - 1)
    end
    local a = redis.call('HMGET', m, 'acct', 'pool')
    push_released(a[1] or '', a[2] or '', rec.id or rec.ext or '', rec.w, tonumber(rec.s), reason, h)
  end
  redis.call('PUBLISH', P .. ':freed', pk)
end
-- The recovery interval of a pool whose streak of 1303s is `stk`: doubled that many times.
local function rinterval(interval, stk)
  return interval * 2 ^ tonumber(stk or '0')
end
-- Past 64 pools, one that holds nothing, hides nothing and has nobody in line is forgotten
-- (its capacity lives in the configuration and P:cap): a new-style create's pool is named by
-- its model, and a client may name any number of them.
local function tidy(pk)
  if redis.call('SCARD', P .. ':pools') <= 64 then return end
  local v = redis.call('HMGET', pk .. ':m', 'used', 'hid')
  if tonumber(v[1] or '0') > 0 or tonumber(v[2] or '0') > 0 then return end
  if redis.call('EXISTS', pk .. ':h') == 1 or redis.call('EXISTS', pk .. ':q') == 1 then return end
  redis.call('DEL', pk .. ':m')
  redis.call('SREM', P .. ':pools', pk)
end
local function maintain(pk, interval)
  local m = pk .. ':m'
  local back = false
  local hidden = tonumber(redis.call('HGET', m, 'hid') or '0')
  if hidden > 0 then
    interval = rinterval(interval, redis.call('HGET', m, 'stk'))
    local rec = tonumber(redis.call('HGET', m, 'rec') or int(now))
    local steps = math.floor((now - rec) / interval)
    if steps > hidden then steps = hidden end
    if steps > 0 then
      hidden = hidden - steps
      if hidden == 0 then rec = now; back = true else rec = rec + interval * steps end
      redis.call('HSET', m, 'hid', hidden, 'rec', int(rec))
      redis.call('PUBLISH', P .. ':freed', pk)
    end
  end
  local expired = redis.call('ZRANGEBYSCORE', pk .. ':l', '-inf', int(now))
  for _, h in ipairs(expired) do
    local raw = redis.call('HGET', pk .. ':h', h)
    if raw then
      -- For the process's warning (the task may still run): `expired:EXT` names the external
      -- id beside the task id in the task field, `expired?` a task field that is the external
      -- id (the create's answer never came). A grant (`=expired`) is no task that ended: its
      -- create was never answered in time (its process stopped, or the create outlasted the
      -- lease), and, should it be answered, its hold counts the task anew, counted at its
      -- end. Warned of, not counted, and, as no task of it ended, it brings no hidden slot
      -- back (its task's end would bring a second).
      local rec = cjson.decode(raw)
      local why = 'expired'
      if rec.k == 'g' then why = '=expired'
      elseif rec.id and rec.ext then why = 'expired:' .. rec.ext
      elseif rec.ext then why = 'expired?' end
      release(pk, h, rec, why, rec.k == 'g')
    else
      redis.call('ZREM', pk .. ':l', h)
    end
  end
  -- A lease that ran out (its process gone), or the last hidden slot come back, may leave
  -- the pool unused, as an end does.
  if back or #expired > 0 then tidy(pk) end
end
local function map_ids(pk, h, id, ext, acct)
  local place = pk .. '\n' .. h
  if id then redis.call('HSET', IDS, id, place) end
  if ext then xfile(xf(acct, ext), nil, place) end
end
local function create(pk, h, w, kind, id, ext, lease, acct, pool, path, adopted)
  local rec = {w = w, s = int(now), k = kind, id = id, ext = ext, p = path, a = adopted}
  redis.call('HSET', pk .. ':h', h, cjson.encode(rec))
  redis.call('ZADD', pk .. ':l', int(now + lease), h)
  redis.call('HINCRBY', pk .. ':m', 'used', w)
  redis.call('HSET', pk .. ':m', 'acct', acct, 'pool', pool)
  redis.call('SADD', P .. ':pools', pk)
  map_ids(pk, h, id, ext, acct)
end
-- A task id names one task: a holding already under it is the same task's earlier create
-- (outcome unknown, sent again); it gives its slots back now instead of hiding them until its
-- lease.
local function supersede(name, pk, h, acct)
  if not name then return end
  local place = redis.call('HGET', IDS, name)
  if not place or place == pk .. '\n' .. h then return end
  local opk, oh = split(place)
  if redis.call('HGET', opk .. ':m', 'acct') ~= acct then return end
  local raw = redis.call('HGET', opk .. ':h', oh)
  if raw then
    release(opk, oh, cjson.decode(raw), nil)
  else
    redis.call('HDEL', IDS, name)
  end
end
-- So does an external id within an account (the EXT field `f`) and a pool, and a create path
-- where known (a create sent again goes to the same path): a holding under it in the same pool
-- whose task id is unknown is the same create's earlier attempt. One known by its task id is a
-- task that runs until it is reported ended, whatever a later create under its external id
-- (the caller reused it, the server made another task) says; one in another pool or on
-- another path is another path's create (external ids may be unique per create path only).
-- Those stay, both findable. Except a task a reconcile adopted in a pool of this create's
-- product (`product`; the account is `f`'s), listed on this create's path where both are
-- known, when this create's task id is unknown (`id` nil: its answer lost after the list
-- named the task): the same task, whose task id this create's holding takes (returned), and
-- whose adopted holding gives its slots back, else the task's end would free only that one.
-- In any pool of the product: a list does not say the model, so the pool a reconcile adopts
-- into may be another model's than the create's.
local function supersede_ext(f, pk, h, path, id, product)
  if not f then return nil end
  local place = pk .. '\n' .. h
  local took = nil
  for _, x in ipairs(xlive(f)) do
    if x.place ~= place and x.pk == pk and not x.rec.id and may_be(x.rec.p, path) then
      release(x.pk, x.h, x.rec, nil)
    elseif not id and not took and x.place ~= place and x.rec.a and x.rec.id
        and may_be(x.rec.p, path) and product_of(x.pk) == product then
      took = x.rec.id
      release(x.pk, x.h, x.rec, nil)
    end
  end
  return took
end
local function capacity(default, first, last)
  for i = first, last or #ARGV do
    local c = redis.call('HGET', P .. ':cap', ARGV[i])
    if c then return tonumber(c) end
  end
  return tonumber(default)
end
local function opt(s) if s == '' then return nil end return s end
-- Makes room in the sorted set `key` (`P:ended`, `P:done`) for `members`: past ENDED_KEPT
-- entries, the oldest (the first to expire) go before the new ones are filed, so a change never
-- evicts what it files; a member already there is renewed in place and takes no room. Returns
-- the members evicted.
local function make_room(key, members)
  local new = 0
  for _, member in ipairs(members) do
    if not redis.call('ZSCORE', key, member) then new = new + 1 end
  end
  local over = redis.call('ZCARD', key) + new - ENDED_KEPT
  if over <= 0 then return {} end
  local gone = redis.call('ZRANGE', key, 0, over - 1)
  redis.call('ZREMRANGEBYRANK', key, 0, over - 1)
  return gone
end
-- Tasks reported ended, each kept ENDED_FOR (this process's lease, at least the default, set
-- by `script`); the set itself as long as its longest entry, and at most ENDED_KEPT entries.
local ENDED = P .. ':ended'
local function note_member(member, ...)
  redis.call('ZREMRANGEBYSCORE', ENDED, '-inf', int(now))
  local members = {member, ...}
  for _, gone in ipairs(make_room(ENDED, members)) do
    -- An evicted `complete` pair (`e:`, which sorts before its twins) takes its task id's
    -- note with it, as the in-process backend forgets the task id's twin first: the external
    -- id's note, left alone, frees one create and is spent.
    if string.sub(gone, 1, 2) == 'e:' then
      local n, rest = string.match(gone, '^e:(%d+)%.(.*)$')
      if n then redis.call('ZREM', ENDED, 'i:' .. string.sub(rest, tonumber(n) + 1)) end
    end
  end
  local at = int(now + ENDED_FOR)
  for _, m in ipairs(members) do redis.call('ZADD', ENDED, at, m) end
  -- Only ever lengthened: a process with a shorter lease must not cut another's entries short.
  local keep = math.floor(ENDED_FOR / 1000)
  if redis.call('PTTL', ENDED) < keep then redis.call('PEXPIRE', ENDED, keep) end
end
local function note_ended(id) note_member('i:' .. id) end
local function noted(member)
  local until_ = redis.call('ZSCORE', ENDED, member)
  return until_ and tonumber(until_) > now
end
local function was_ended(id)
  if not id then return false end
  return noted('i:' .. id)
end
-- An external id reported ended within its account (`field`: its field in EXT): by `complete`
-- (`x:`), or by a report that named a task id too (`z:`, beside its pair). `with_id`: for a
-- holding (or a listed task) known by a task id, which a `z:` note does not name: that
-- report named another task (of another create path, or under a reused external id), and its
-- note is kept for a create of unknown outcome.
local function ext_ended(field, with_id)
  if not field then return false end
  return noted('x:' .. field) or (not with_id and noted('z:' .. field))
end
-- A task whose end was counted in the finished-task metrics (`c:` task id, beside its `i:`):
-- a release of its holding by a report, or its reporter said so when it sent the end again.
local function mark_counted(id)
  note_member('c:' .. id)
end
local function end_counted(id)
  local until_ = redis.call('ZSCORE', ENDED, 'c:' .. id)
  return until_ and tonumber(until_) > now
end
-- Takes a create out of the fleet's queue; true if it was in it.
local function leave(pk, h)
  return leave_place(pk .. ':q', pk .. ':qx', h)
end
-- When the latest halt, reset or capacity Redis applied was made (fleet time, µs), by field
-- (`h:` halt key, `c:` capacity field): a change replayed late (kept while Redis was away, or
-- queued behind such changes) that was made before it is older news, and is dropped. A change
-- sent at once always applies, as before (made now, if its process had not measured fleet
-- time when it made it); a replayed one with no stamp applies and records none.
local STAMPS = P .. ':stamps'
-- The stamp of `field`, unless it is further ahead of this script's time than the fleet's
-- clocks may differ (STAMP_SLACK): its writer's clock was wrong (an offset measured against
-- a server whose clock was off), and it says nothing of order; trusted, it would drop every
-- replay until fleet time caught up with it. Not trusted, the next change replaces it.
local function stamp_of(field)
  local last = tonumber(redis.call('HGET', STAMPS, field) or '')
  if not last or last > now + STAMP_SLACK then return nil end
  return last
end
local function stale(field, at, replayed)
  local made = tonumber(at)
  if replayed ~= '1' or not made then return false end
  local last = stamp_of(field)
  return last ~= nil and made < last
end
local function stamp(field, at, replayed)
  local made = tonumber(at)
  if not made then
    if replayed == '1' then return end
    made = now
  end
  local last = stamp_of(field)
  if not last or made > last then redis.call('HSET', STAMPS, field, int(made)) end
end
";

/// Acquire. ARGV: 4 pool key, 5 holding, 6 weight, 7 configured capacity, 8 halt key,
/// 9 recovery interval, 10 grant lease, 11 account, 12 pool, 13 arrival (µs), 14 how long a
/// place outlives its last ask (µs), 15 '1' to take a place when it must wait, 16.. capacity
/// fields.
/// Returns {0, lost} granted, {1, next wake or -1, lost} full or another create is ahead,
/// {2, grace end, lost}, {3, cause, lost, {}, when the halt was made ('' not
/// known)} halted, {4, capacity, lost} never fits; once the
/// pool's leases were checked, the tasks whose lease ran out follow as a last element (flat
/// septuples, as `APPLY` returns them), so the metrics count them once, in this process.
///
/// The fleet's order: each process sends only its queue's head, with the instant that create
/// arrived; heads are served in arrival order, so the fleet's waiting creates are too. A place
/// lasts while its process keeps asking (each ask renews it); a process that stops loses it.
/// A create that takes no place (its process serves whoever asks first) is still kept behind
/// those that hold one and arrived before it.
const ACQUIRE_BODY: &str = r"
local pk = ARGV[4]
local h = ARGV[5]
local w = tonumber(ARGV[6])
local cause = redis.call('GET', ARGV[8])
if cause then
  if leave(pk, h) then redis.call('PUBLISH', P .. ':freed', pk) end
  -- With when it was made, as Redis has it: a process that learns the halt here and sends it
  -- again after a loss of state sends it with that time, so a reset made after it stays.
  local at = stamp_of('h:' .. ARGV[8])
  return {3, cause, lost, {}, at and int(at) or ''}
end
if redis.call('HEXISTS', pk .. ':h', h) == 1 then return {0, lost} end
if now < grace_until then return {2, grace_until, lost} end
maintain(pk, tonumber(ARGV[9]))
local cap = capacity(ARGV[7], 16)
if cap > 0 and w > cap then
  if leave(pk, h) then redis.call('PUBLISH', P .. ':freed', pk) end
  return {4, cap, lost, released}
end
-- Whether a create that arrived earlier waits in the fleet's queue, and until when its place lasts.
local q = pk .. ':q'
local qx = pk .. ':qx'
local ahead_until = ahead_of(q, qx, h, tonumber(ARGV[13]), now)
local m = pk .. ':m'
local v = redis.call('HMGET', m, 'used', 'hid', 'rec', 'stk')
local used = tonumber(v[1] or '0')
local hidden = tonumber(v[2] or '0')
if hidden > cap then hidden = cap end
if not ahead_until and used + w <= cap - hidden then
  create(pk, h, w, 'g', nil, nil, tonumber(ARGV[10]), ARGV[11], ARGV[12])
  leave(pk, h)
  -- The next in line asks at once if a slot is still free.
  if used + w < cap - hidden and redis.call('ZCARD', q) > 0 then
    redis.call('PUBLISH', P .. ':freed', pk)
  end
  return {0, lost, released}
end
-- A create's arrival is the same at every ask: its place keeps its rank.
if ARGV[15] == '1' then take_place(q, qx, h, ARGV[13], now + tonumber(ARGV[14]), now) end
local nxt = -1
local first = redis.call('ZRANGE', pk .. ':l', 0, 0, 'WITHSCORES')
if first[2] then nxt = tonumber(first[2]) end
if hidden > 0 then
  local rec = tonumber(v[3] or int(now)) + rinterval(tonumber(ARGV[9]), v[4])
  if nxt < 0 or rec < nxt then nxt = rec end
end
-- A place ahead that is not renewed ends then: ask again at that instant.
if ahead_until and (nxt < 0 or ahead_until < nxt) then nxt = ahead_until end
return {1, nxt, lost, released}
";

/// Every change. `ARGV[4]` is the operation; see each branch. Returns {lost, changed, released
/// as flat septuples (account, pool, task, weight, since, reason, holding)} or, for `ex`,
/// {lost, 0, flags, lease ends}, for `alive` {lost, 0, {}, flags}, for `caps` {lost, 0,
/// capacities, `P:cap` (flat field/value)}.
const APPLY_BODY: &str = r"
local op = ARGV[4]
local changed = 0
-- A change whose replay could undo a later one (a capacity, a halt, a halt's reset, a 1303,
-- which would hide again the slots that came back since) carries an id: sent again after its
-- answer was lost (a timeout after Redis ran it), it is skipped. So do a task's end (`upd`
-- with an end), whose replay, finding the holding released, would file its note again (to
-- free a later create under the same external id), and a create's hold. The tasks such a
-- change released are kept with its id (`P:rel:ID`), and a skipped replay answers with them:
-- the process whose answer was lost counts their ends, once. Ids are kept as long as
-- `P:ended` keeps an end, and at most ENDED_KEPT of them.
local once = nil
do
  if op == 'cap' then once = ARGV[9] elseif op == 'halt' then once = ARGV[10]
  elseif op == 'unhalt' then once = ARGV[6] elseif op == 'upd' then once = ARGV[8]
  elseif op == 'cong' then once = ARGV[9] elseif op == 'hold' then once = ARGV[15] end
  if once == '' then once = nil end
  if once then
    local done = P .. ':done'
    redis.call('ZREMRANGEBYSCORE', done, '-inf', int(now))
    if redis.call('ZSCORE', done, once) then
      local kept = redis.call('GET', P .. ':rel:' .. once)
      if kept then released = cjson.decode(kept) end
      return {lost, 0, released}
    end
    for _, gone in ipairs(make_room(done, {once})) do redis.call('DEL', P .. ':rel:' .. gone) end
    redis.call('ZADD', done, int(now + ENDED_FOR), once)
    local keep = math.floor(ENDED_FOR / 1000)
    if redis.call('PTTL', done) < keep then redis.call('PEXPIRE', done, keep) end
  end
end
-- Gives back the grant `h` of the pool `pk`, of `w` slots (a number): only a grant (`g`) of
-- that weight is the reservation's. A task (the reservation was kept under one already: a
-- stale copy given back), or a grant of another weight (a forged reservation), is not, and
-- keeps its slots, else a create would get in past the pool's limit. Returns `freed`, `none`
-- (no holding `h`: given back already, or never granted) or `other`. With no `w` (nil: a
-- queued hold the process turned into a give-back, its task's end dropped from the replay
-- queue), whatever `h` is goes: that hold may have run in Redis, its answer lost, and made
-- the grant a task.
local function give(pk, h, w)
  local raw = redis.call('HGET', pk .. ':h', h)
  if not raw then return 'none' end
  local rec = cjson.decode(raw)
  if w and (rec.k ~= 'g' or tonumber(rec.w) ~= w) then return 'other' end
  release(pk, h, rec, nil)
  return 'freed'
end
-- Forgets what the 1303s said of the pool whose meta hash is `m` (a create proved more fit,
-- or a capacity was set): hidden slots come back at the configured interval from now, not
-- recounted in short steps over the time spent at the longer one.
local function end_streak(m)
  if tonumber(redis.call('HGET', m, 'stk') or '0') > 0 then
    redis.call('HSET', m, 'stk', 0, 'rec', int(now))
  end
  redis.call('HSET', m, 'lvl', 0)
end
-- A create of the fleet succeeded: when the tasks held (not the grants still awaiting an
-- answer, which may yet meet a 1303) fill the last 1303's level, the streak of 1303s ends.
local function prove_level(pk)
  local m = pk .. ':m'
  local v = redis.call('HMGET', m, 'used', 'lvl')
  local lvl = tonumber(v[2] or '0')
  if lvl == 0 or tonumber(v[1] or '0') < lvl then return end
  local held = 0
  for _, raw in ipairs(redis.call('HVALS', pk .. ':h')) do
    local rec = cjson.decode(raw)
    if rec.k ~= 'g' then held = held + tonumber(rec.w) end
  end
  if held >= lvl then end_streak(m) end
end
if op == 'give' then
  -- 5 pool key, 6 grant, 7 its weight ('': the holding, whatever it is; see `give`). Also a
  -- waiting create that gave up: its place in the fleet's queue goes, and the next in line
  -- asks. (A stale or forged reservation frees nothing, and changes nothing.)
  if give(ARGV[5], ARGV[6], tonumber(ARGV[7])) ~= 'other' then changed = 1 end
  if leave(ARGV[5], ARGV[6]) then redis.call('PUBLISH', P .. ':freed', ARGV[5]) end
  tidy(ARGV[5])
elseif op == 'cong' then
  -- 5 pool key, 6 grant, 7 weight, 8 configured capacity, 9 the change's id (read above),
  -- 10.. capacity fields.
  -- As kling-concurrency's `PoolState::congested`: the pool is believed to hold only what the
  -- fleet holds now, and a 1303 again at no more slots than the last one's, for a create
  -- granted after it, doubles the recovery interval (up to MAX_DOUBLINGS times) and stops
  -- ended tasks bringing slots back. The 1303s of creates granted before it (a burst, or a
  -- grant no longer found) lower the level and leave the streak.
  local pk = ARGV[5]
  local m = pk .. ':m'
  local raw = redis.call('HGET', pk .. ':h', ARGV[6])
  local granted = nil
  if raw then granted = tonumber(cjson.decode(raw).s) end
  -- A holding of the grant's token that is no grant of this weight (a task the reservation
  -- was kept under already, a forged weight): a stale 1303, which frees and hides nothing.
  -- (A process sends the 1303 of a grant it no longer has as a give-back.)
  if give(pk, ARGV[6], tonumber(ARGV[7])) == 'other' then return {lost, 0, released} end
  local cap = capacity(ARGV[8], 10)
  local v = redis.call('HMGET', m, 'used', 'lvl', 'stk', 'lvlat')
  local used = tonumber(v[1] or '0')
  local level = used + tonumber(ARGV[7])
  local lvl = tonumber(v[2] or '0')
  local stk = tonumber(v[3] or '0')
  -- (A pool a script without `lvlat` wrote: every grant counts as after it.)
  local at = v[4] or '0'
  if lvl == 0 or (granted and granted > tonumber(at)) then
    if lvl > 0 and level <= lvl then stk = math.min(stk + 1, MAX_DOUBLINGS) else stk = 0 end
    at = int(now)
  end
  local hidden = cap - used
  if hidden < 0 then hidden = 0 end
  redis.call('HSET', m, 'hid', hidden, 'rec', int(now), 'lvl', level, 'stk', stk, 'lvlat', at)
  changed = 1
elseif op == 'halt' then
  -- 5 pool key, 6 grant, 7 halt key, 8 cause, 9 the process's number (not read), 10 the
  -- change's id (read above), 11 the grant's weight, 12 when it was made, 13 '1' replayed.
  -- The account is halted whatever the grant: a stale or forged one frees nothing.
  give(ARGV[5], ARGV[6], tonumber(ARGV[11]))
  -- (As after any give-back: a pool past the first 64 may be left unused.)
  tidy(ARGV[5])
  -- A replay made before a later reset (or halt) of the account halts nothing.
  if not stale('h:' .. ARGV[7], ARGV[12], ARGV[13]) then
    stamp('h:' .. ARGV[7], ARGV[12], ARGV[13])
    redis.call('SET', ARGV[7], ARGV[8])
    redis.call('PUBLISH', P .. ':freed', '*')
    -- Every process learns of the halt now, not at its next ask: a create it granted before
    -- and still holds below its slots (in a rate limiter) is then refused unsent.
    redis.call('PUBLISH', P .. ':halted', int(grace_until) .. '\n' .. ARGV[7] .. '\n' .. ARGV[8])
    changed = 1
  end
elseif op == 'hold' or op == 'reg' then
  -- 5 pool key, 6 holding, 7 weight, 8 id, 9 ext, 10 lease, 11 account, 12 pool, 13 kind,
  -- 14 create path ('' not known), 15 (hold) the change's id (read above), (reg) '1' for a
  -- task a reconcile adopted
  local pk = ARGV[5]
  local h = ARGV[6]
  local id = opt(ARGV[8])
  local ext = opt(ARGV[9])
  local lease = tonumber(ARGV[10])
  local path = opt(ARGV[14] or '')
  if op == 'hold' then
    supersede(id, pk, h, ARGV[11])
    local product = string.match(ARGV[12], '^[^:]*')
    id = supersede_ext(ext and xf(ARGV[11], ext), pk, h, path, id, product) or id
  end
  local raw = redis.call('HGET', pk .. ':h', h)
  -- Its end reported first (by another process, before this hold or registration reached
  -- Redis): by its task id, or by its external id within its account. The text an end
  -- `complete` told was filed both ways (`e:` marks the pair); whichever matches first says
  -- which the text was, and the other reading is dropped. A note under an external id frees
  -- one create and is spent (a later create may carry the external id again), as is the
  -- external id's note of a pair (`p:`: a report told the task with its external id) whose
  -- task id matched; a task id's note stays (task ids are never reused).
  local told = nil
  local counted = false
  local xfield = ext and xf(ARGV[11], ext)
  if was_ended(id) then
    told = id
    local twin = xf(ARGV[11], id)
    if noted('e:' .. twin) then redis.call('ZREM', ENDED, 'x:' .. twin, 'e:' .. twin) end
    if xfield then
      local pair = 'p:' .. id .. '\n' .. xfield
      if noted(pair) then redis.call('ZREM', ENDED, 'x:' .. xfield, 'z:' .. xfield, pair) end
    end
  elseif ext_ended(xfield, id) then
    told = ext
    if noted('e:' .. xfield) then redis.call('ZREM', ENDED, 'i:' .. ext) end
    redis.call('ZREM', ENDED, 'x:' .. xfield, 'z:' .. xfield, 'e:' .. xfield)
    -- (So that this hold, replayed after its answer was lost, holds nothing.)
    note_member('h:' .. h)
  elseif not raw and noted('h:' .. h) then
    -- This hold again (replayed after its answer was lost), its holding released since by
    -- a report that found it by its external id: the end was counted by that report.
    told = id or ext or ''
    counted = true
  end
  if told then
    -- The slots go back now, reported released here, and counted here unless the end was
    -- counted already (`=`: a release it made before Redis lost it).
    local reason = 'completed'
    if counted or end_counted(told) then reason = '=completed' else mark_counted(told) end
    if raw then
      local rec = cjson.decode(raw)
      rec.id = id
      rec.ext = ext
      release(pk, h, rec, reason)
      -- (As after any other end: a pool past the first 64 may be left unused.)
      tidy(pk)
    else
      push_released(ARGV[11], ARGV[12], id or ext, tonumber(ARGV[7]), now, reason, h)
    end
    changed = 1
  elseif raw and op == 'hold' then
    local rec = cjson.decode(raw)
    rec.k = 't'
    rec.id = id
    rec.ext = ext
    rec.p = path
    rec.s = int(now)
    redis.call('HSET', pk .. ':h', h, cjson.encode(rec))
    redis.call('ZADD', pk .. ':l', int(now + lease), h)
    map_ids(pk, h, id, ext, ARGV[11])
    if id then prove_level(pk) end
    changed = 1
  elseif raw then
    -- A registration of a holding an older state brought back: its copy keeps the lease that
    -- state had, which may be over while the task runs on (renewed since by a report, the
    -- owner's or another process's, that the older state lacks). It lasts what the owner has
    -- left of it, never less than the copy's.
    local l = pk .. ':l'
    local ends = now + lease
    local was = redis.call('ZSCORE', l, h)
    if not was or tonumber(was) < ends then redis.call('ZADD', l, int(ends), h) end
    -- The copy may be older than the hold (a snapshot taken between the grant and it: a
    -- grant, with no task id) or than a report that taught it the task id: it takes the task
    -- and the ids the owner holds it under, so an end reported by either, in any process,
    -- finds it.
    local rec = cjson.decode(raw)
    local learnt = false
    if ARGV[13] == 't' and rec.k ~= 't' then rec.k = 't'; learnt = true end
    if id and not rec.id then rec.id = id; learnt = true end
    if ext and not rec.ext then rec.ext = ext; learnt = true end
    if path and not rec.p then rec.p = path; learnt = true end
    if ARGV[15] == '1' and not rec.a then rec.a = true; learnt = true end
    if learnt then
      redis.call('HSET', pk .. ':h', h, cjson.encode(rec))
      map_ids(pk, h, rec.id, rec.ext, ARGV[11])
    end
  elseif not raw then
    local kind = 't'
    local adopted = nil
    if op == 'reg' then
      kind = ARGV[13]
      if ARGV[15] == '1' then adopted = true end
    end
    create(pk, h, tonumber(ARGV[7]), kind, id, ext, lease, ARGV[11], ARGV[12], path, adopted)
    -- (A hold whose grant Redis never had: one made while Redis was away, whose registration
    -- this hold replaced in the replay queue.)
    if op == 'hold' and id then prove_level(pk) end
    changed = 1
  end
elseif op == 'adopt' then
  -- Held, or reported ended already (the server's list ran behind the report). By its
  -- external id, a holding of the listed task's product whose task id is unknown may be it;
  -- one known by another task id is another task (of another create path, whose external ids
  -- may be the same), and so is one of another product (an image create, for a video task:
  -- another create path's; another model's pool of the product may be the task's, a list
  -- does not say its model) or of another known create path than the list's (14: an
  -- image2video create, for a task a text2video list names), and an end a report of another
  -- task id told (`z:`). The adopted holding keeps the list's path.
  local id = opt(ARGV[8])
  local ext = opt(ARGV[9])
  local xfield = ext and xf(ARGV[11], ext)
  local product = string.match(ARGV[12], '^[^:]*')
  local path = opt(ARGV[14] or '')
  local by_id = (id and redis.call('HEXISTS', IDS, id) == 1) or was_ended(id)
  local known = by_id
  if not known and xfield then
    for _, x in ipairs(xlive(xfield)) do
      if (not id or not x.rec.id) and may_be(x.rec.p, path) and product_of(x.pk) == product then
        known = true
      end
    end
    known = known or ext_ended(xfield, id)
  end
  if not known then
    create(ARGV[5], ARGV[6], tonumber(ARGV[7]), 't', id, ext, tonumber(ARGV[10]), ARGV[11], ARGV[12], path, true)
    changed = 1
  elseif id and xfield and not by_id then
    -- Held under its external id alone (a create whose answer was lost): the holding learns
    -- the task id the list names, as a report of the task running teaches it, so that an end
    -- told by task id alone (`complete`, a callback without the external id) frees it.
    local x = by_external(ARGV[11], path, ext, false, product)
    if x then
      x.rec.id = id
      redis.call('HSET', x.pk .. ':h', x.h, cjson.encode(x.rec))
      redis.call('HSET', IDS, id, x.place)
      redis.call('ZADD', x.pk .. ':l', int(now + tonumber(ARGV[10])), x.h)
    end
  end
elseif op == 'upd' then
  -- 5 lease, 6 the reports' account (external ids are looked up within it), 7 '1' if an end
  -- that finds no holding is noted, 8 the change's id (read above), 9 the create path of the
  -- tasks reported ('' not known: they are found by external id on any), then quads: id, ext,
  -- status ('' = said ended), flag: 0 running, 1 ended; an end sent again after a new
  -- generation, 2 if its first report's release was counted, else 3 (its releases are not).
  -- An end that finds no holding is noted only from a report of one task (a callback, a query
  -- of it; never a list page, whose ends are long past), the way an end overtakes its create's
  -- answer, and when sent again such an end or one that released a holding: a list page or a
  -- batch reports many tasks long released, which would push the ends that matter out.
  local lease = tonumber(ARGV[5])
  local acct = ARGV[6]
  local note_ends = ARGV[7] == '1'
  local path = opt(ARGV[9])
  local i = 10
  while i + 3 <= #ARGV do
    local id = ARGV[i]
    local ext = ARGV[i + 1]
    local status = ARGV[i + 2]
    local flag = ARGV[i + 3]
    local terminal = flag ~= '0'
    i = i + 4
    if flag == '2' then mark_counted(id) end
    -- A task is found by its task id (an empty one is no task's: a report by external id
    -- alone, as a lookup's that found no task under it), else by external id: a report that
    -- names a task id, or a lookup that found nothing (a legacy query on another create path,
    -- a lookup the server has not indexed yet), finds only a create of unknown outcome (one
    -- known by another task id is another task: of another create path, whose external ids
    -- may be the same, or under a reused one); `complete`'s text (no status) any holding. Of
    -- the reports' create path where known, and only the one holding that may be it.
    local place = nil
    if id ~= '' then place = redis.call('HGET', IDS, id) end
    local by_ext = false
    local pk, h, rec = nil, nil, nil
    if place then
      pk, h = split(place)
      local raw = redis.call('HGET', pk .. ':h', h)
      if raw then rec = cjson.decode(raw) end
    else
      local x = nil
      if ext ~= '' then x = by_external(acct, path, ext, false) end
      if not x and status == '' then
        x = by_external(acct, path, id, id ~= '')
        by_ext = x and true or false
      end
      if x then place, pk, h, rec = x.place, x.pk, x.h, x.rec end
    end
    -- A task a reconcile adopted from a list that did not give its external id, reported by
    -- task id with it: a create of unknown outcome of the account and product under that
    -- external id (its answer lost) is the same task, held twice. The create's holding takes
    -- the task id and the adopted one gives its slots back, as `supersede_ext` does when the
    -- create comes second; else the task's end would free only one of them. A create of
    -- another product, or of another path than the one the task was listed on (where known,
    -- else the report's), is another create path's, whose external ids may be the same.
    local joined = false
    if rec and not by_ext and rec.a and not rec.ext and ext ~= ''
        and redis.call('HGET', pk .. ':m', 'acct') == acct then
      local x = by_external(acct, rec.p or path, ext, false)
      if x and x.place ~= place and product_of(x.pk) == product_of(pk) then
        release(pk, h, rec, nil)
        x.rec.id = id
        redis.call('HSET', x.pk .. ':h', x.h, cjson.encode(x.rec))
        redis.call('HSET', IDS, id, x.place)
        place, pk, h, rec = x.place, x.pk, x.h, x.rec
        joined = true
      end
    end
    if terminal and id ~= '' and (rec or note_ends) then
      local field = xf(acct, id)
      if status ~= '' then
        -- A report of the task: the text is a task id, whatever `complete` left open. Told
        -- with its external id before the create's answer, it is filed under that external
        -- id of the account too (`z:`), paired (`p:`): a create whose answer is then lost is
        -- kept under its external id only (only such a create: one answered with another task
        -- id is another task). The first holding either frees spends the external id's note.
        -- So is the end of a task a reconcile adopted (its holding's, else the report's
        -- external id): its create's answer may still come, and be lost.
        local xext = nil
        if not rec then xext = opt(ext) elseif rec.a then xext = rec.ext or opt(ext) end
        if xext then
          local xfield = xf(acct, xext)
          note_member('i:' .. id, 'z:' .. xfield, 'p:' .. id .. '\n' .. xfield)
        else
          note_ended(id)
        end
        redis.call('ZREM', ENDED, 'e:' .. field)
      elseif by_ext then
        -- (`complete` by the external id of a holding: nothing is filed under it, which would
        -- free a later create carrying it; the holding is noted below.) Its task id, if its
        -- create's answer (or a report) gave one, is noted ended: a reconcile's list answered
        -- before this end names the task running, and must not adopt it.
        if rec and rec.id then note_ended(rec.id) end
      elseif place then
        note_ended(id)
      else
        -- `complete` before the create's answer came: its text may be the task id or the
        -- external id the create carries (in this account). Filed both ways, paired.
        note_member('i:' .. id, 'x:' .. field, 'e:' .. field)
      end
    end
    if rec then
      changed = 1
      if terminal then
        local reason = 'completed'
        if status ~= '' then reason = 'ended:' .. status end
        -- A lookup by external id that found no task (an empty id, no status): the create
        -- held under it never happened. Its slots go back, listed as `completed`, but no task
        -- ended: none is counted (`=`), and no hidden slot comes back for it.
        local unmade = id == '' and status == ''
        if unmade then reason = '=completed' end
        -- The reporting process counts it (not when it sends the end again). Found by its
        -- external id, its task id's note (above) says so too: a registration of the task
        -- after Redis went back finds that note first, and counts the end no second time.
        if flag == '1' and not unmade then
          mark_counted(id)
          if by_ext and rec.id then mark_counted(rec.id) end
        end
        -- A holding no task id note names (found by its external id): noted itself, so
        -- that its create's hold, replayed after its answer was lost, holds nothing.
        if not rec.id or rec.id ~= id or joined then note_member('h:' .. h) end
        release(pk, h, rec, reason, unmade)
        -- A task's end, like a give-back, may leave a pool past the first 64 unused.
        tidy(pk)
      else
        local l = pk .. ':l'
        local first = redis.call('ZRANGE', l, 0, 0, 'WITHSCORES')
        local ends = int(now + lease)
        redis.call('ZADD', l, ends, h)
        -- Renewed shorter, to before the pool's next deadline: waiting creates sleep until
        -- that deadline (or a poll), so they ask again now, and learn the earlier one.
        if first[2] and tonumber(ends) < tonumber(first[2]) then
          redis.call('PUBLISH', P .. ':freed', pk)
        end
        if not rec.id and id ~= '' then
          rec.id = id
          redis.call('HSET', pk .. ':h', h, cjson.encode(rec))
          redis.call('HSET', IDS, id, place)
        end
      end
    end
  end
elseif op == 'cap' and stale('c:' .. ARGV[5], ARGV[10], ARGV[11]) then
  -- A replay made before a later setting of the same capacity: older news, dropped.
  changed = 0
elseif op == 'cap' then
  -- 5 capacity field, 6 capacity, 7 account ('' for every account), 8 pool (a product alone
  -- also covers its models' pools), 9 the change's id (read above), 10 when it was made,
  -- 11 '1' replayed
  stamp('c:' .. ARGV[5], ARGV[10], ARGV[11])
  local old = redis.call('HGET', P .. ':cap', ARGV[5])
  redis.call('HSET', P .. ':cap', ARGV[5], ARGV[6])
  -- What earlier 1303s said about the old capacity is no evidence now: the pools it covers
  -- forget their streaks, as kling-concurrency's do.
  local acct, pool = ARGV[7], ARGV[8]
  local product = not string.find(pool, ':', 1, true)
  for _, pk in ipairs(redis.call('SMEMBERS', P .. ':pools')) do
    local v = redis.call('HMGET', pk .. ':m', 'acct', 'pool')
    local p = v[2] or ''
    if (acct == '' or v[1] == acct)
      and (p == pool or (product and string.sub(p, 1, #pool + 1) == pool .. ':')) then
      end_streak(pk .. ':m')
    end
  end
  redis.call('PUBLISH', P .. ':freed', '*')
  if old ~= ARGV[6] then changed = 1 end
elseif op == 'newgen' then
  -- 5 the generation that went back: a new one starts, with a grace (once: a process that
  -- asks later finds the new one).
  if redis.call('GET', P .. ':alive') == ARGV[5] then
    local g = now + tonumber(ARGV[3])
    if int(g) == ARGV[5] then g = g + 1 end
    redis.call('SET', P .. ':alive', int(g))
    lost = int(g) .. ':' .. seq
    changed = 1
  end
elseif op == 'mine' then
  -- 5 this process's holding prefix, then the holdings it has. After a new generation, while
  -- its grace lasts (no create was granted in it), the process's holdings that came back
  -- although it no longer has them (given back or ended after the snapshot) are released.
  if now < grace_until then
    local prefix = ARGV[5]
    local mine = {}
    for i = 6, #ARGV do mine[ARGV[i]] = true end
    for _, pk in ipairs(redis.call('SMEMBERS', P .. ':pools')) do
      for _, h in ipairs(redis.call('HKEYS', pk .. ':h')) do
        if string.sub(h, 1, #prefix) == prefix and not mine[h] then
          local raw = redis.call('HGET', pk .. ':h', h)
          release(pk, h, cjson.decode(raw), nil)
          changed = 1
        end
      end
    end
  end
elseif op == 'unhalt' and stale('h:' .. ARGV[5], ARGV[7], ARGV[8]) then
  -- 5 halt key, 6 the change's id (read above), 7 when it was made, 8 '1' replayed. A reset
  -- made before a later halt of the account (one that came while it waited for Redis) is not
  -- that halt's: the halt stays.
  changed = 0
elseif op == 'unhalt' then
  stamp('h:' .. ARGV[5], ARGV[7], ARGV[8])
  local cause = redis.call('GET', ARGV[5])
  changed = redis.call('DEL', ARGV[5])
  -- Every process that knows of this halt forgets it now, not at its next maintenance pass:
  -- a restart before that pass would have it send the halt again.
  if cause then redis.call('PUBLISH', P .. ':unhalted', ARGV[5] .. '\n' .. cause) end
elseif op == 'rehalt' then
  -- After a new generation, the halts a process knows of, sent again: quadruples of the halt
  -- key, the cause, the process's number for it (not read) and when it was made ('' not
  -- known). One set meanwhile stays; one reset meanwhile, after it was made, is not undone.
  local i = 5
  while i + 3 <= #ARGV do
    local field = 'h:' .. ARGV[i]
    if not stale(field, ARGV[i + 3], '1') and redis.call('SET', ARGV[i], ARGV[i + 1], 'NX') then
      stamp(field, ARGV[i + 3], '1')
      changed = 1
      redis.call('PUBLISH', P .. ':halted', int(grace_until) .. '\n' .. ARGV[i] .. '\n' .. ARGV[i + 1])
    end
    i = i + 4
  end
  if changed == 1 then redis.call('PUBLISH', P .. ':freed', '*') end
elseif op == 'alive' then
  -- 5.. the halt keys the process knows Redis had in this generation: whether each is set.
  local flags = {}
  for i = 5, #ARGV do table.insert(flags, redis.call('EXISTS', ARGV[i])) end
  return {lost, 0, released, flags}
elseif op == 'caps' then
  -- 5 recovery interval, then per pool: pool key, configured capacity, how many capacity
  -- fields follow, the fields. Each pool's capacity less what a 1303 hides, recovered to now
  -- as `maintain` would (read only: the next script that touches the pool writes it).
  local interval = tonumber(ARGV[5])
  local caps = {}
  local i = 6
  while i + 2 <= #ARGV do
    local pk = ARGV[i]
    local fields = tonumber(ARGV[i + 2])
    local cap = capacity(ARGV[i + 1], i + 3, i + 2 + fields)
    local v = redis.call('HMGET', pk .. ':m', 'hid', 'rec', 'stk')
    local hidden = tonumber(v[1] or '0')
    if hidden > 0 then
      local every = rinterval(interval, v[3])
      hidden = hidden - math.floor((now - tonumber(v[2] or int(now))) / every)
      if hidden < 0 then hidden = 0 end
    end
    if hidden > cap then hidden = cap end
    table.insert(caps, cap - hidden)
    i = i + 3 + fields
  end
  return {lost, 0, caps, redis.call('HGETALL', P .. ':cap')}
elseif op == 'ex' then
  -- 5.. pool key and holding pairs: whether each holding exists, and when its lease ends
  -- (-1: no lease), which another process's report of its task may have renewed.
  local flags = {}
  local untils = {}
  local i = 5
  while i + 1 <= #ARGV do
    table.insert(flags, redis.call('HEXISTS', ARGV[i] .. ':h', ARGV[i + 1]))
    table.insert(untils, tonumber(redis.call('ZSCORE', ARGV[i] .. ':l', ARGV[i + 1]) or '-1'))
    i = i + 2
  end
  return {lost, 0, flags, untils}
end
if once and #released > 0 then
  -- (Numbers as text: cjson keeps 14 digits only.)
  local flat = {}
  for i, v in ipairs(released) do
    if type(v) == 'number' then flat[i] = int(v) else flat[i] = v end
  end
  redis.call('SET', P .. ':rel:' .. once, cjson.encode(flat), 'PX', math.floor(ENDED_FOR / 1000))
end
return {lost, changed, released}
";

/// Every pool's state. `ARGV[4]` recovery interval. Returns {lost, capacity overrides (flat
/// field/value), pools (flat quintuples: account, pool, used, hidden, tasks), the tasks whose
/// lease ran out (flat septuples, as `APPLY` returns them)}.
const SNAPSHOT_BODY: &str = r"
local out = {}
for _, pk in ipairs(redis.call('SMEMBERS', P .. ':pools')) do
  maintain(pk, tonumber(ARGV[4]))
  local v = redis.call('HMGET', pk .. ':m', 'acct', 'pool', 'used', 'hid')
  local tasks = 0
  for _, raw in ipairs(redis.call('HVALS', pk .. ':h')) do
    if cjson.decode(raw).k == 't' then tasks = tasks + 1 end
  end
  table.insert(out, v[1] or '')
  table.insert(out, v[2] or '')
  table.insert(out, tonumber(v[3] or '0'))
  table.insert(out, tonumber(v[4] or '0'))
  table.insert(out, tasks)
end
return {lost, redis.call('HGETALL', P .. ':cap'), out, released}
";

/// Reads halts with when they were made, in one step (no halt of one change read with the
/// stamp of another). ARGV: 1 `P:stamps`, 2 `P:alive`, 3.. halt keys. Returns {the values of
/// `P:alive` and the halt keys (`MGET`), their `h:` stamps (`HMGET`)}. Not a slots script: it
/// starts no generation and takes no number. A stamp is returned as Redis has it; one written
/// on a wrong clock (far ahead) is not trusted by the scripts, and sent back it does what no
/// stamp does.
pub(crate) const READ_HALTS: &str = r"
local keys, fields = {ARGV[2]}, {}
for i = 3, #ARGV do
  table.insert(keys, ARGV[i])
  table.insert(fields, 'h:' .. ARGV[i])
end
local stamps = {}
if #fields > 0 then stamps = redis.call('HMGET', ARGV[1], unpack(fields)) end
return {redis.call('MGET', unpack(keys)), stamps}
";

/// How many entries `P:ended` (and `P:done`) keep at most, the oldest forgotten first: a
/// fleet's ends with their external ids (three entries each, and one once the end is counted),
/// as many as one process of kling-concurrency's in-process backend remembers (4096).
///
/// What the bound costs: a task's end pushed out (by the fleet's later ends) before a
/// reconcile's adopt of the task looks for it lets a list that named the task running adopt
/// it, its slot held until its lease runs out. A reconcile adopts each page's tasks as soon as
/// the page is answered (while a task that ends after its page is still held, nothing is
/// adopted), so that takes that many ends within one page's round trip, or a list that far
/// behind the ends; not over the whole reconcile
/// (`slots::a_task_ended_after_its_page_is_not_adopted_however_many_ends_follow`).
pub(crate) const ENDED_KEPT: usize = 4 * 4096;

/// How far the fleet's clocks may differ at most, for the stamps of halts, resets and
/// capacities (`P:stamps`): a stamp further ahead of a script's time was written on a wrong
/// clock and is not trusted, and a process's own changes are stamped in order across a new
/// measurement of the server's clock that moved its fleet time back by less than this. Well
/// past a measurement's error (half a probe's round trip, a probe on a loaded host included).
pub(crate) const STAMP_SLACK: Duration = Duration::from_secs(1);

pub(crate) fn acquire(ended_for: Duration) -> String {
    script(ACQUIRE_BODY, ended_for)
}

pub(crate) fn apply(ended_for: Duration) -> String {
    script(APPLY_BODY, ended_for)
}

pub(crate) fn snapshot(ended_for: Duration) -> String {
    script(SNAPSHOT_BODY, ended_for)
}

/// A slots script: `body` after the queue's functions and [`PRELUDE`], with `ENDED_FOR` (how
/// long `P:ended` keeps a task, µs) `ended_for`, as long as the process keeps the ends it
/// reported, `ENDED_KEPT` [`ENDED_KEPT`], `MAX_DOUBLINGS` kling-concurrency's cap on a
/// streak of 1303s, and `STAMP_SLACK` [`STAMP_SLACK`] (µs).
fn script(body: &str, ended_for: Duration) -> String {
    let ended_for = ended_for.as_micros();
    let doublings = kling_concurrency::MAX_RECOVERY_DOUBLINGS;
    let slack = STAMP_SLACK.as_micros();
    format!(
        "local ENDED_FOR = {ended_for}\nlocal ENDED_KEPT = {ENDED_KEPT}\n\
         local MAX_DOUBLINGS = {doublings}\nlocal STAMP_SLACK = {slack}\n{QUEUE}{PRELUDE}{body}"
    )
}
