-- bench/cache.lua PORT BINDIR: modules/cache.lua's flush against the
-- runbook, on a redis-server of its own at 127.0.0.1:PORT (bench_cache.sh
-- starts it).
--
-- TOTAL keys, MATCH of them gemini:* (filled by rbe-redis-floor), deleted by
--   (a) the runbook: redis-cli KEYS 'gemini:*' | xargs redis-cli DEL
--   (b) cache.flush(r, "gemini:*")                 SCAN + pipelined UNLINK
--   (c) cache.flush(r, "gemini:*", {max_keys})     a counting pass first
--   (d) with CACHE_BENCH_BACKUP=1, once: cache.flush{backup = file}
-- While each runs, a second process (rbe-redis-floor ping) PINGs every
-- 10 ms and records its worst round trip: KEYS blocks the server for the
-- whole keyspace, SCAN pages never do.  cache.count (what `rbe plan`
-- shows) is timed too.
--
-- Sizes: CACHE_BENCH_KEYS (2000000), CACHE_BENCH_MATCH (1000000); every
-- contender runs CACHE_BENCH_REPEAT (3) times, interleaved, and the best
-- run is compared (the spread is printed).  Figures and ratios only;
-- nothing passes or fails on timings.
local rbe = require "rbe"
local redis = require "rbe.redis"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local cache = require "cache"

local PORT = assert(arg[1], "usage: cache.lua PORT BINDIR")
local BINDIR = assert(arg[2], "usage: cache.lua PORT BINDIR")
local FLOOR = BINDIR .. "/rbe-redis-floor"
local TOTAL = tonumber(os.getenv("CACHE_BENCH_KEYS") or 2000000)
local MATCH = tonumber(os.getenv("CACHE_BENCH_MATCH") or 1000000)
local REPEAT = tonumber(os.getenv("CACHE_BENCH_REPEAT") or 3)
local BACKUP = os.getenv("CACHE_BENCH_BACKUP") == "1"

local r <close> = redis.connect("redis://127.0.0.1:" .. PORT, { timeout = "5m" })

local function fill()
  r:flushall()
  proc.run { FLOOR, "fill", PORT, tostring(TOTAL), tostring(MATCH) }
  assert(r:dbsize() == TOTAL, "fill failed")
end

local function check_deleted(name)
  local left = r:dbsize()
  assert(left == TOTAL - MATCH, ("%s left %d keys, want %d"):format(name, left, TOTAL - MATCH))
end

-- fn's seconds and the worst PING (ms) of a second process meanwhile
local function with_pinger(fn)
  local pinger = proc.spawn({ FLOOR, "ping", PORT, "10" }, { stderr = "inherit" })
  assert(pinger:lines()() == "ready")
  rbe.sleep(0.05)
  local t0 = rbe.now()
  fn()
  local secs = rbe.now() - t0
  rbe.sleep(0.05)
  pinger:kill("TERM")
  local res = pinger:wait()
  pinger:close()
  local worst = res.stdout:match("worst_ms ([%d.]+)")
  return secs, tonumber(worst)
end

local contenders = {
  { name = "runbook", label = "runbook: redis-cli KEYS | xargs redis-cli DEL", fn = function()
    proc.sh(("redis-cli -p %s KEYS 'gemini:*' | xargs redis-cli -p %s DEL >/dev/null")
      :format(PORT, PORT), { timeout = "10m" })
  end },
  { name = "flush", label = "cache.flush(r, 'gemini:*')", fn = function()
    local n = cache.flush(r, "gemini:*")
    assert(n == MATCH, "cache.flush deleted " .. n)
  end },
  { name = "guarded", label = "cache.flush{max_keys} (count, then flush)", fn = function()
    local n = cache.flush(r, "gemini:*", { max_keys = MATCH })
    assert(n == MATCH, "cache.flush deleted " .. n)
  end },
}

local results = {}
for _, c in ipairs(contenders) do results[c.name] = { secs = {}, worst = {} } end
local count_secs = {}
for _ = 1, REPEAT do
  for _, c in ipairs(contenders) do
    fill()
    if c.name == "flush" then
      local t0 = rbe.now()
      assert(cache.count(r, "gemini:*") == MATCH)
      count_secs[#count_secs + 1] = rbe.now() - t0
    end
    collectgarbage()
    local secs, worst = with_pinger(c.fn)
    check_deleted(c.name)
    local res = results[c.name]
    res.secs[#res.secs + 1] = secs
    res.worst[#res.worst + 1] = worst
  end
end

local function runs(t, fmt)
  local o = {}
  for i, v in ipairs(t) do o[i] = fmt:format(v) end
  return table.concat(o, "/")
end
local function median(t)
  local s = { table.unpack(t) }
  table.sort(s)
  return s[(#s + 1) // 2]
end

print(("cache.flush: %d of %d keys match gemini:* (redis-server on 127.0.0.1:%s), best of %d")
  :format(MATCH, TOTAL, PORT, REPEAT))
for _, c in ipairs(contenders) do
  local res = results[c.name]
  res.best = math.min(table.unpack(res.secs))
  res.median_ping = median(res.worst)
  res.max_ping = math.max(table.unpack(res.worst))
  print(("  %-46s %6.3f s (runs %s)  %8.0f keys/s  worst PING per run %s ms")
    :format(c.label, res.best, runs(res.secs, "%.2f"), MATCH / res.best,
      runs(res.worst, "%.1f")))
end
print(("  %-46s %6.3f s (runs %s)"):format("cache.count (what rbe plan runs)",
  math.min(table.unpack(count_secs)), runs(count_secs, "%.2f")))

local a, b, c = results.runbook, results.flush, results.guarded
print(("  ratio runbook / cache.flush          = %.2fx (goal > 1: faster than the runbook)")
  :format(a.best / b.best))
print(("  ratio runbook / cache.flush{max_keys} = %.2fx"):format(a.best / c.best))
print(("  worst PING during cache.flush        = %.1f ms median of runs, %.1f ms max "
  .. "(goal <= 10 ms); runbook: %.1f ms median, %.1f ms max")
  :format(b.median_ping, b.max_ping, a.median_ping, a.max_ping))

if BACKUP then
  fill()
  local dir = fs.tmpdir("rbe-bench-cache-")
  local path = dir .. "/flush.backup"
  local info
  local secs, worst = with_pinger(function()
    local _
    _, info = cache.flush(r, "gemini:*", { backup = path, backup_max_bytes = 2 ^ 31 })
  end)
  check_deleted("backup")
  local t0 = rbe.now()
  local res = cache.restore(r, path)
  local rsecs = rbe.now() - t0
  assert(res.restored == MATCH, "restored " .. res.restored)
  print(("  cache.flush{backup}: %.3f s, %d bytes saved, worst PING %.1f ms; "
    .. "cache.restore: %.3f s"):format(secs, info.backup.bytes, worst, rsecs))
  fs.remove(dir, { recursive = true })
end
r:flushall()
