"""The store's Lua scripts (`engine/store/redis_store.py` runs them). Each script touches only keys
of one session (one slot) and returns {status, ...}. Scripts that a client retry could run twice are
idempotent: create (nonce), commit (its own generation already current), acquire (nonce in the lease
value), admit (membership). The tenant index's script (admit) touches only that index's key."""


_WRITER_CHECK = """
local function writer_error(fence_key, lease_key, fence)
  if fence == '*' then return nil end  -- an update of labels only (see RedisStore.update)
  if fence ~= '' then
    local cur = redis.call('GET', fence_key)
    if cur ~= fence then
      return {'lease_conflict', 'fence ' .. fence .. ' is stale (latest lease: ' .. (cur or 'none') .. ')'}
    end
  elseif redis.call('EXISTS', lease_key) == 1 then
    return {'lease_conflict', 'the session is leased to another writer'}
  end
  return nil
end
"""

# The session exists, this writer may write, and no other write came since it read generation ARGV[2].
_GUARDED = _WRITER_CHECK + """
local function guard()
  if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
  local err = writer_error(KEYS[2], KEYS[3], ARGV[1])
  if err then return err end
  if (redis.call('HGET', KEYS[1], 'gen') or '0') ~= ARGV[2] then return {'retry'} end
  return nil
end
"""

# KEYS: hash, fence, pending marker | ARGV: nonce, ttl_ms|'', field, value, ...
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'nonce') == ARGV[1] then return {'ok'} end
  return {'exists'}
end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[1], 'nonce', ARGV[1], unpack(ARGV, 3))
if ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {'ok'}
"""

# KEYS: hash, fence, lease, old parts..., new parts...
# ARGV: fence|'', expected gen, write id, n_old, n_new, ttl_ms|'', field, value, ... (gen among them)
_COMMIT = _WRITER_CHECK + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
if redis.call('HGET', KEYS[1], 'wid') == ARGV[3] then return {'ok', redis.call('HGETALL', KEYS[1])} end
local err = writer_error(KEYS[2], KEYS[3], ARGV[1])
if err then return err end
local cur = redis.call('HGET', KEYS[1], 'gen') or '0'
if cur ~= ARGV[2] then
  return {'lease_conflict', 'a concurrent commit moved the session from generation '
          .. ARGV[2] .. ' to ' .. cur}
end
local n_old, n_new, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local first = 4 + n_old
for i = first, first + n_new - 1 do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {'parts_missing', KEYS[i]} end
end
for i = first, first + n_new - 1 do
  if ttl ~= '' then redis.call('PEXPIRE', KEYS[i], ttl) else redis.call('PERSIST', KEYS[i]) end
end
redis.call('HSET', KEYS[1], 'wid', ARGV[3], unpack(ARGV, 7))
if ttl ~= '' then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
for i = 4, 3 + n_old do redis.call('UNLINK', KEYS[i]) end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: hash, fence, lease, current parts...
# ARGV: fence|'', expected gen, ttl_ms|''|'-1' (no expiry from now on), field, value, ...
_UPDATE = _GUARDED + """
local err = guard()
if err then return err end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[3] == '-1' then
  for i = 1, #KEYS do if i ~= 3 then redis.call('PERSIST', KEYS[i]) end end
elseif ARGV[3] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  for i = 4, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: hash, fence, lease, current parts... | ARGV: fence|'', expected gen, fence retention ms
_DELETE = _GUARDED + """
local err = guard()
if err then return err end
for i = 4, #KEYS do redis.call('UNLINK', KEYS[i]) end
redis.call('UNLINK', KEYS[1])
redis.call('DEL', KEYS[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
return {'ok'}
"""

# KEYS: hash, fence, lease | ARGV: nonce, owner, ttl_ms, lease value to take over|''
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
local v = redis.call('GET', KEYS[3])
if v then
  local f, n = string.match(v, '^(%d+) (%S+)')
  if n == ARGV[1] then return {'ok', f} end
  if v ~= ARGV[4] then return {'held', v, redis.call('PTTL', KEYS[3])} end
  redis.call('DEL', KEYS[3])
end
local f = redis.call('INCR', KEYS[2])
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then redis.call('PEXPIRE', KEYS[2], pttl) else redis.call('PERSIST', KEYS[2]) end
redis.call('SET', KEYS[3], f .. ' ' .. ARGV[1] .. ' ' .. ARGV[2], 'NX', 'PX', ARGV[3])
return {'ok', tostring(f)}
"""

# KEYS: tenant index | ARGV: sid, cap|''
_ADMIT = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return {'member'} end
local n = redis.call('SCARD', KEYS[1])
if ARGV[2] ~= '' and n >= tonumber(ARGV[2]) then return {'full', n} end
redis.call('SADD', KEYS[1], ARGV[1])
return {'added'}
"""

# KEYS: lease | ARGV: nonce, ttl_ms
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^%d+ (%S+)') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease | ARGV: nonce
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^%d+ (%S+)') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

SCRIPTS = {"create": _CREATE, "commit": _COMMIT, "update": _UPDATE, "admit": _ADMIT,
           "delete": _DELETE, "acquire": _ACQUIRE, "renew": _RENEW, "release": _RELEASE}
