-- cache: flush Redis keys by pattern without blocking Redis.  SCAN pages
-- (never KEYS), each page's keys removed with one UNLINK sent while the
-- next page is read, a count for `rbe plan`, a max_keys guard that refuses
-- to delete more than expected, an optional backup of the keys (DUMP and
-- their expiry, into a file) that an undo RESTOREs, FLUSHDB only with an
-- explicit confirmation, and the hit rate from INFO stats.  The module
-- owns no connection: callers pass an rbe.redis client (the *_step
-- builders take a URL, opened per call).
--
--   cache.count(r, patterns[, {batch, type}]) -> n, per_pattern      [yields]
--   cache.flush(r, patterns[, {batch, max_keys, backup, type}]) -> n, info
--   cache.restore(r, path[, {replace}]) -> {restored, existing, expired}
--   cache.flushdb(r, {confirm = "FLUSHDB"}) -> keys removed           [yields]
--   cache.hit_rate(r[, {window}]) -> rate, {hits, misses}             [yields]
--   cache.flush_step{...}, cache.flushdb_step{...}
--
-- See docs/modules/cache.md.
local rbe = require "rbe"
local kit = require "rbe.stepkit"
local fs = require "rbe.fs"

local type, pairs, ipairs, error, tostring, tonumber, pcall, select =
  type, pairs, ipairs, error, tostring, tonumber, pcall, select
local format, concat, unpack = string.format, table.concat, table.unpack

local M = {}

M.BACKUP_MAGIC = "RBE-CACHE-BACKUP 1\n"
M.DEFAULT_BACKUP_MAX_BYTES = 256 * 1024 * 1024

---------------------------------------------------------------------------
-- helpers

local cerror = kit.error_for("cache")

local check_fields = kit.check_fields

local function is_redis_client(v)
  return type(v) == "table" and type(v.call) == "function" and type(v.pipeline) == "function"
end

local function check_client(r, fname)
  if not is_redis_client(r) then
    error(fname .. ": an rbe.redis client expected, got " .. type(r), 3)
  end
end

-- "48213" -> "48,213"
local function thousands(n)
  local s = tostring(math.tointeger(n) or n)
  local head, digits = s:match("^(-?)(%d+)$")
  if not digits then return s end
  return head .. digits:reverse():gsub("(%d%d%d)", "%1,"):reverse():gsub("^,", "")
end
M.thousands = thousands

local function pattern_list(patterns, fname)
  if type(patterns) == "string" then patterns = { patterns } end
  if type(patterns) ~= "table" or #patterns == 0 then
    error(fname .. ": a pattern or a list of patterns expected", 3)
  end
  for i, p in ipairs(patterns) do
    if type(p) ~= "string" or p == "" then
      error(format("%s: pattern %d must be a non-empty string", fname, i), 3)
    end
  end
  return patterns
end

-- true for a pattern that matches every key ("*", "**", "***")
local function matches_all(p) return p:match("^%*+$") ~= nil end

-- Redis's glob (stringmatchlen: * ? [abc] [^a-z] \x) as an anchored Lua
-- pattern, to tell whether a key of one pattern also matches an earlier one
local function glob_to_lua(glob)
  local out, i, n = { "^" }, 1, #glob
  local function lit(c)
    if c:match("%w") then return c end
    return "%" .. c
  end
  while i <= n do
    local c = glob:sub(i, i)
    if c == "*" then out[#out + 1] = ".*"
    elseif c == "?" then out[#out + 1] = "."
    elseif c == "\\" and i < n then
      i = i + 1
      out[#out + 1] = lit(glob:sub(i, i))
    elseif c == "[" then
      local j = i + 1
      local set = { "[" }
      if glob:sub(j, j) == "^" then set[2] = "^"; j = j + 1 end
      local closed = false
      while j <= n do
        local d = glob:sub(j, j)
        if d == "]" then closed = true break end
        if d == "\\" and j < n then
          j = j + 1
          set[#set + 1] = lit(glob:sub(j, j))
        elseif glob:sub(j + 1, j + 1) == "-" and j + 2 <= n and glob:sub(j + 2, j + 2) ~= "]" then
          set[#set + 1] = lit(d) .. "-" .. lit(glob:sub(j + 2, j + 2))
          j = j + 2
        else
          set[#set + 1] = lit(d)
        end
        j = j + 1
      end
      if closed and #set > (set[2] == "^" and 2 or 1) then
        set[#set + 1] = "]"
        out[#out + 1] = concat(set)
        i = j
      else
        out[#out + 1] = "%["
      end
    else
      out[#out + 1] = lit(c)
    end
    i = i + 1
  end
  out[#out + 1] = "$"
  return concat(out)
end
M._glob_to_lua = glob_to_lua

---------------------------------------------------------------------------
-- count

local COUNT_OPTS = { batch = true, type = true }

-- cache.count(r, patterns[, {batch = 1000, type}]) -> total, per_pattern
-- A key that matches several patterns counts once (for the first).
function M.count(r, patterns, opts)
  check_client(r, "cache.count")
  local pats = pattern_list(patterns, "cache.count")
  opts = check_fields(opts, COUNT_OPTS, "cache.count")
  local earlier, total, per = {}, 0, {}
  for i, p in ipairs(pats) do
    local n = 0
    for keys in r:scan { match = p, count = opts.batch or 1000, type = opts.type,
                         batch = true, unique = false } do
      if i == 1 then
        n = n + #keys
      else
        for _, k in ipairs(keys) do
          local dup = false
          for _, lp in ipairs(earlier) do
            if k:find(lp) then dup = true break end
          end
          if not dup then n = n + 1 end
        end
      end
    end
    earlier[#earlier + 1] = glob_to_lua(p)
    per[p] = (per[p] or 0) + n
    total = total + n
  end
  return total, per
end

---------------------------------------------------------------------------
-- backup file: MAGIC, then per key "<klen>:<vlen>:<expire_at_ms|-1>\n"
-- followed by the key, the DUMP payload and "\n"

-- DUMP the keys of one page (with their expiry, absolute, from the
-- server's clock) as backup records; returns the text and how many keys
local function dump_page(r, keys)
  local replies = r:pipeline(function(p)
    p:call("TIME")
    for _, k in ipairs(keys) do
      p:call("PTTL", k)
      p:call("DUMP", k)
    end
  end)
  local t = replies[1]
  local now_ms = tonumber(t[1]) * 1000 + tonumber(t[2]) // 1000
  local out, n = {}, 0
  for i, k in ipairs(keys) do
    local pttl, payload = replies[2 * i], replies[2 * i + 1]
    if rbe.is_error(pttl) then error(pttl, 0) end
    if rbe.is_error(payload) then error(payload, 0) end
    if type(payload) == "string" and pttl ~= -2 then
      local at = pttl >= 0 and (now_ms + pttl) or -1
      out[#out + 1] = format("%d:%d:%d\n", #k, #payload, at) .. k .. payload .. "\n"
      n = n + 1
    end
  end
  return concat(out), n
end

-- records of a backup file: iterator of key, payload, expire_at_ms
local function records(data, path)
  if data:sub(1, #M.BACKUP_MAGIC) ~= M.BACKUP_MAGIC then
    error(cerror("EBADMSG", path .. " is not a cache backup written by rbe"), 0)
  end
  local pos = #M.BACKUP_MAGIC + 1
  return function()
    if pos > #data then return nil end
    local a, b, kl, vl, at = data:find("^(%d+):(%d+):(%-?%d+)\n", pos)
    if not a then
      error(cerror("EBADMSG", format("%s: damaged record at byte %d", path, pos - 1)), 0)
    end
    kl, vl = tonumber(kl), tonumber(vl)
    local key = data:sub(b + 1, b + kl)
    local payload = data:sub(b + kl + 1, b + kl + vl)
    if #payload ~= vl or data:sub(b + kl + vl + 1, b + kl + vl + 1) ~= "\n" then
      error(cerror("EBADMSG", format("%s: truncated record at byte %d", path, pos - 1)), 0)
    end
    pos = b + kl + vl + 2
    return key, payload, tonumber(at)
  end
end

---------------------------------------------------------------------------
-- flush

local FLUSH_OPTS = { batch = true, max_keys = true, backup = true, backup_max_bytes = true,
  type = true }

-- cache.flush(r, patterns[, {batch = 1000, max_keys, backup = path,
-- backup_max_bytes = 256 MiB, type}]) -> deleted, info
-- info: {deleted, patterns = {pattern = n}, seconds, backup = {path, keys,
-- bytes}}.  Raises `cache`/EMAXKEYS before deleting anything when more
-- than max_keys keys match, and stops (having deleted no more than
-- max_keys) if keys added meanwhile would take it over.
function M.flush(r, patterns, opts)
  check_client(r, "cache.flush")
  local pats = pattern_list(patterns, "cache.flush")
  opts = check_fields(opts, FLUSH_OPTS, "cache.flush")
  local batch = opts.batch or 1000
  if math.type(batch) ~= "integer" or batch < 1 then
    error("cache.flush: batch must be a positive integer", 2)
  end
  local max_keys = opts.max_keys
  if max_keys ~= nil and (math.type(max_keys) ~= "integer" or max_keys < 0) then
    error("cache.flush: max_keys must be a non-negative integer", 2)
  end
  for _, p in ipairs(pats) do
    if matches_all(p) and max_keys == nil then
      error(format("cache.flush: pattern '%s' matches every key; give max_keys "
        .. "(or use cache.flushdb)", p), 2)
    end
  end
  local backup = opts.backup
  if backup ~= nil and (type(backup) ~= "string" or backup == "") then
    error("cache.flush: backup must be a file path", 2)
  end
  local max_bytes = opts.backup_max_bytes or M.DEFAULT_BACKUP_MAX_BYTES
  local t0 = rbe.now()

  if max_keys then
    local total = M.count(r, pats, { batch = batch, type = opts.type })
    if M._after_count then M._after_count(total) end   -- tests only
    if total > max_keys then
      error(cerror("EMAXKEYS", format("%s keys match %s, more than max_keys %s: "
        .. "nothing deleted", thousands(total), concat(pats, ", "), thousands(max_keys)),
        { matched = total, max_keys = max_keys }), 0)
    end
  end

  local info = { deleted = 0, patterns = {} }
  local bk
  if backup then
    fs.write(backup, M.BACKUP_MAGIC, { mode = "0600" })
    bk = { path = backup, keys = 0, bytes = #M.BACKUP_MAGIC }
    info.backup = bk
  end

  local inflight, pending = {}, 0
  local function unlink(keys, pat)
    local n = r:call("UNLINK", unpack(keys))
    pending = pending - #keys
    info.deleted = info.deleted + n
    info.patterns[pat] = (info.patterns[pat] or 0) + n
  end
  local function join_all()
    while inflight[1] do table.remove(inflight, 1):join() end
  end

  local ok, err = pcall(function()
    for _, pat in ipairs(pats) do
      info.patterns[pat] = info.patterns[pat] or 0
      for keys in r:scan { match = pat, count = batch, type = opts.type, batch = true,
                           unique = false } do
        if max_keys and info.deleted + pending + #keys > max_keys then
          join_all()
          if info.deleted + #keys > max_keys
             and info.deleted + r:call("EXISTS", unpack(keys)) > max_keys then
            error(cerror("EMAXKEYS", format("stopped after deleting %s keys: more "
              .. "than max_keys %s match now (keys were added during the flush)",
              thousands(info.deleted), thousands(max_keys)),
              { deleted = info.deleted, max_keys = max_keys }), 0)
          end
        end
        if bk then
          local text, nk = dump_page(r, keys)
          if bk.bytes + #text > max_bytes then
            error(cerror("EFBIG", format("the backup would pass backup_max_bytes "
              .. "(%s bytes): stopped after deleting %s keys, all saved in %s "
              .. "(cache.restore puts them back)", thousands(max_bytes),
              thousands(info.deleted), backup), { deleted = info.deleted, path = backup }), 0)
          end
          fs.append(backup, text)
          bk.bytes, bk.keys = bk.bytes + #text, bk.keys + nk
        end
        if #inflight >= 2 then table.remove(inflight, 1):join() end
        pending = pending + #keys
        inflight[#inflight + 1] = rbe.spawn(unlink, keys, pat)
      end
    end
    join_all()
    if bk then fs.append(backup, "", { fsync = true }) end
  end)
  if not ok then
    -- cancel the UNLINK helpers and let them unwind before raising
    for _, t in ipairs(inflight) do t:cancel() end
    while true do
      local live = {}
      for _, t in ipairs(inflight) do
        if not t:done() then live[#live + 1] = t end
      end
      if not live[1] or not pcall(rbe.wait_any, live, true) then break end
    end
    for _, t in ipairs(inflight) do t:error() end
    if rbe.is_error(err) and err.kind == "cache" and err.deleted == nil then
      err.deleted = info.deleted
    end
    error(err, 0)
  end
  info.seconds = rbe.now() - t0
  return info.deleted, info
end

---------------------------------------------------------------------------
-- restore

-- cache.restore(r, path[, {replace = false, batch = 500}]) ->
-- {restored, existing, expired, path}: RESTOREs the keys of a backup with
-- their original expiry; keys that exist again are left alone (counted
-- in `existing`) unless replace is true; keys whose expiry passed are
-- skipped.
function M.restore(r, path, opts)
  check_client(r, "cache.restore")
  if type(path) ~= "string" then error("cache.restore: backup path expected", 2) end
  opts = check_fields(opts, { replace = true, batch = true }, "cache.restore")
  local data = fs.read(path)
  local res = { restored = 0, existing = 0, expired = 0, path = path }
  local batch = opts.batch or 500
  local t = r:call("TIME")
  local now_ms = tonumber(t[1]) * 1000 + tonumber(t[2]) // 1000
  local queue = {}
  local function send()
    if #queue == 0 then return end
    local replies = r:pipeline(function(p)
      for _, rec in ipairs(queue) do
        local args = { "RESTORE", rec[1], rec[3] > 0 and rec[3] or 0, rec[2] }
        if rec[3] > 0 then args[#args + 1] = "ABSTTL" end
        if opts.replace then args[#args + 1] = "REPLACE" end
        p:call(unpack(args))
      end
    end)
    for i = 1, replies.n do
      local v = replies[i]
      if rbe.is_error(v) then
        if v.code == "BUSYKEY" then res.existing = res.existing + 1
        else
          v.message = format("%s (restoring key %q from %s)", v.message, queue[i][1], path)
          error(v, 0)
        end
      else
        res.restored = res.restored + 1
      end
    end
    queue = {}
  end
  for key, payload, at in records(data, path) do
    if at >= 0 and at <= now_ms then
      res.expired = res.expired + 1
    else
      queue[#queue + 1] = { key, payload, at }
      if #queue >= batch then send() end
    end
  end
  send()
  return res
end

---------------------------------------------------------------------------
-- FLUSHDB, hit rate

-- cache.flushdb(r, {confirm = "FLUSHDB", async = true}) -> keys removed
function M.flushdb(r, opts)
  check_client(r, "cache.flushdb")
  opts = check_fields(opts, { confirm = true, async = true }, "cache.flushdb")
  if opts.confirm ~= "FLUSHDB" then
    error("cache.flushdb: this deletes every key of the database: pass "
      .. "{confirm = \"FLUSHDB\"} to do it", 2)
  end
  local n = r:call("DBSIZE")
  if opts.async == false then r:call("FLUSHDB", "SYNC") else r:call("FLUSHDB", "ASYNC") end
  return n
end

local function hits(r)
  local s = r:info("stats")
  return tonumber(s.keyspace_hits) or 0, tonumber(s.keyspace_misses) or 0
end

-- cache.hit_rate(r[, {window = d}]) -> rate (0..1, nil when no lookups),
-- {hits, misses}: since the server started (or CONFIG RESETSTAT), or over
-- the next `window` when given
function M.hit_rate(r, opts)
  check_client(r, "cache.hit_rate")
  opts = check_fields(opts, { window = true }, "cache.hit_rate")
  local h, m = hits(r)
  if opts.window then
    rbe.sleep(rbe.duration(opts.window))
    local h2, m2 = hits(r)
    h, m = h2 - h, m2 - m
  end
  local rate = (h + m) > 0 and h / (h + m) or nil
  return rate, { hits = h, misses = m }
end

---------------------------------------------------------------------------
-- ready-made steps

local STEP_FIELDS = { timeout = true, undo_timeout = true, retries = true, backoff = true,
  confirm = true, on_failure = true, description = true, when = true,
  idempotent = true }

local resolve = kit.resolve

local function base_spec(o, known, fname)
  if type(o) ~= "table" then error(fname .. ": options table expected", 3) end
  for k in pairs(o) do
    if not known[k] and not STEP_FIELDS[k] then
      error(format("%s: unknown option '%s'", fname, tostring(k)), 3)
    end
  end
  if o.redis == nil then error(fname .. ": redis is required", 3) end
  local spec = {}
  for k in pairs(STEP_FIELDS) do spec[k] = o[k] end
  return spec
end

local function with_redis(o, ctx, fn)
  local v = resolve(o.redis, ctx)
  if is_redis_client(v) then return fn(v) end
  if type(v) ~= "string" and not rbe.is_secret(v) then
    error("cache step: redis must be a URL, an rbe.secret, an rbe.redis client "
      .. "or function(ctx) returning one", 0)
  end
  local r <close> = require("rbe.redis").connect(v)
  return fn(r)
end

local function per_pattern_text(per, pats)
  local bits = {}
  for _, p in ipairs(pats) do bits[#bits + 1] = format("%s %s", thousands(per[p] or 0), p) end
  return concat(bits, ", ")
end

-- the step's backup files in the run directory: one per attempt (a retry
-- or an `rbe resume` must never overwrite what an earlier attempt saved)
local function backup_files(ctx)
  local name = tostring(ctx.step or "cache"):gsub("[^%w%-_.]+", "-")
  local dir = ctx.run_dir or "."
  local files = {}
  local first = dir .. "/cache-" .. name .. ".backup"
  if fs.exists(first) then files[1] = first end
  local i = 2
  while fs.exists(format("%s/cache-%s.%d.backup", dir, name, i)) do
    files[#files + 1] = format("%s/cache-%s.%d.backup", dir, name, i)
    i = i + 1
  end
  local next_path = #files == 0 and first or format("%s/cache-%s.%d.backup", dir, name, i)
  return files, next_path
end

-- cache.flush_step{redis, patterns, batch, max_keys, backup = false,
-- backup_max_bytes, type, replace_on_undo} -> a pb.step spec.  With
-- backup, the keys are saved under the run directory first and the undo
-- RESTOREs them; without, the step has no undo.
function M.flush_step(o)
  local spec = base_spec(o, { redis = true, patterns = true, batch = true, max_keys = true,
    backup = true, backup_max_bytes = true, type = true, replace_on_undo = true },
    "cache.flush_step")
  if o.patterns == nil then error("cache.flush_step: patterns is required", 2) end

  spec.run = function(ctx)
    local pats = pattern_list(resolve(o.patterns, ctx), "cache.flush_step")
    return with_redis(o, ctx, function(r)
      local path = o.backup and select(2, backup_files(ctx)) or nil
      local ok, n, info = rbe.try(M.flush, r, pats, { batch = o.batch,
        max_keys = resolve(o.max_keys, ctx), backup = path,
        backup_max_bytes = o.backup_max_bytes, type = o.type })
      if not ok then
        -- the runner undoes completed steps only: put back what this one
        -- deleted before it failed (cancellation held off meanwhile)
        local err = n
        if path and fs.exists(path) then
          local rok, res = rbe.shield(rbe.try, M.restore, r, path,
            { replace = o.replace_on_undo })
          if rok then
            ctx.log("cache: step failed: %s keys put back from %s", thousands(res.restored), path)
          else
            ctx.log("cache: step failed, and restoring %s failed too: %s", path,
              tostring(res.message or res))
            if rbe.is_error(err) then err.compensation_error = res end
          end
        end
        error(err, 0)
      end
      ctx.log("cache: unlinked %s keys (%s) in %.2fs", thousands(n),
        per_pattern_text(info.patterns, pats), info.seconds)
      local res = { deleted = n, patterns = info.patterns }
      if info.backup then
        res.backup, res.backed_up = info.backup.path, info.backup.keys
        ctx.log("cache: %s keys saved in %s (%s bytes)", thousands(info.backup.keys),
          info.backup.path, thousands(info.backup.bytes))
      end
      return res
    end)
  end

  if o.backup then
    spec.undo = function(ctx)
      local files = backup_files(ctx)
      if #files == 0 then
        ctx.log("cache: no backup in %s: nothing to restore", tostring(ctx.run_dir))
        return
      end
      with_redis(o, ctx, function(r)
        -- newest first: a key saved twice comes back as the later copy
        for i = #files, 1, -1 do
          local out = M.restore(r, files[i], { replace = o.replace_on_undo })
          ctx.log("cache: restored %s keys from %s (%s exist again and were left, "
            .. "%s had expired)", thousands(out.restored), files[i], thousands(out.existing),
            thousands(out.expired))
        end
      end)
    end
  end

  spec.plan = function(ctx)
    local pats = pattern_list(resolve(o.patterns, ctx), "cache.flush_step")
    return with_redis(o, ctx, function(r)
      local total, per = M.count(r, pats, { batch = o.batch, type = o.type })
      local max_keys = resolve(o.max_keys, ctx)
      local out = {}
      if max_keys and total > max_keys then
        out[1] = format("would REFUSE: %s keys match (%s), more than max_keys %s",
          thousands(total), per_pattern_text(per, pats), thousands(max_keys))
      else
        out[1] = format("would UNLINK %s keys (%s)", thousands(total),
          per_pattern_text(per, pats))
      end
      out[2] = o.backup
        and "keys are saved (DUMP) under the run directory first; undo restores them"
        or "no backup: undo cannot bring the keys back"
      return out
    end)
  end
  return spec
end

-- cache.flushdb_step{redis, confirm = "text shown to the operator"} -> a
-- pb.step spec running FLUSHDB ASYNC; it has no undo.  The operator's
-- confirmation (the step's `confirm`, or --yes) is the explicit one.
function M.flushdb_step(o)
  local spec = base_spec(o, { redis = true }, "cache.flushdb_step")
  spec.confirm = o.confirm or "FLUSHDB deletes every key of this Redis database"
  spec.run = function(ctx)
    return with_redis(o, ctx, function(r)
      local n = M.flushdb(r, { confirm = "FLUSHDB" })
      ctx.log("cache: FLUSHDB removed %s keys", thousands(n))
      return { deleted = n }
    end)
  end
  spec.plan = function(ctx)
    return with_redis(o, ctx, function(r)
      return format("would FLUSHDB (%s keys) after the operator confirms; no undo",
        thousands(r:call("DBSIZE")))
    end)
  end
  return spec
end

return M
