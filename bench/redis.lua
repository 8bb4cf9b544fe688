-- bench/redis.lua PORT BINDIR: rbe.redis against its baselines, on a
-- redis-server of its own at 127.0.0.1:PORT (bench_redis.sh starts it).
--
-- 1. Pattern delete: TOTAL keys, MATCH of them gemini:*; delete those by
--    (a) the runbook way: redis-cli KEYS 'gemini:*' | xargs redis-cli DEL
--    (b) the floor: bin/rbe-redis-floor, C hiredis, SCAN + pipelined UNLINK
--    (c) rbe: r:unlink_matching("gemini:*") (the same SCAN + UNLINK)
--    (d) rbe, the plain loop a playbook might write: scan{batch} + unlink
--    While each runs, a second client (the floor's ping mode, a separate
--    process) PINGs every 10 ms and records the worst latency.
-- 2. Pipelined SET and GET on one connection, 64 per round trip, against
--    redis-benchmark -c 1 -P 64.
--
-- Sizes: REDIS_BENCH_KEYS (2000000), REDIS_BENCH_MATCH (1000000),
-- REDIS_BENCH_OPS (1000000 SETs and as many GETs).  Every measurement is
-- repeated REDIS_BENCH_REPEAT times (3), the contenders interleaved, and
-- the best run of each is compared (the spread is printed): server and
-- client share the machine's cores, and one run is noisy.  Figures and
-- ratios only; nothing passes or fails on timings.
local rbe = require "rbe"
local redis = require "rbe.redis"
local proc = require "rbe.proc"

local PORT = assert(arg[1], "usage: redis.lua PORT BINDIR")
local BINDIR = assert(arg[2], "usage: redis.lua PORT BINDIR")
local FLOOR = BINDIR .. "/rbe-redis-floor"
local TOTAL = tonumber(os.getenv("REDIS_BENCH_KEYS") or 2000000)
local MATCH = tonumber(os.getenv("REDIS_BENCH_MATCH") or 1000000)
local OPS = tonumber(os.getenv("REDIS_BENCH_OPS") or 1000000)
local REPEAT = tonumber(os.getenv("REDIS_BENCH_REPEAT") or 3)
local URL = "redis://127.0.0.1:" .. PORT

local r <close> = redis.connect(URL, { timeout = "2m" })

local function fill()
  r:flushall()
  proc.run { FLOOR, "fill", PORT, tostring(TOTAL), tostring(MATCH) }
  assert(r:dbsize() == TOTAL, "fill failed")
end

local function check_deleted(name)
  local left = r:dbsize()
  assert(left == TOTAL - MATCH, ("%s left %d keys, want %d"):format(name, left, TOTAL - MATCH))
  assert(r:scan { match = "gemini:*", count = 10000 }() == nil, name .. " left gemini keys")
end

-- Run fn while a separate process PINGs every 10 ms; returns fn's elapsed
-- seconds (or what fn returns) and the worst PING latency in ms.
local function with_pinger(fn)
  local pinger = proc.spawn({ FLOOR, "ping", PORT, "10" }, { stderr = "inherit" })
  assert(pinger:lines()() == "ready")
  rbe.sleep(0.05)
  local t0 = rbe.now()
  local secs = fn()
  local elapsed = secs or (rbe.now() - t0)
  rbe.sleep(0.05)
  pinger:kill("TERM")
  local res = pinger:wait()
  pinger:close()
  local pings, worst = res.stdout:match("pings (%d+) worst_ms ([%d.]+)")
  return elapsed, tonumber(worst), tonumber(pings)
end

local methods = {
  { name = "runbook", label = "runbook: KEYS | xargs DEL (baseline a)", fn = function()
    proc.sh(("redis-cli -p %s KEYS 'gemini:*' | xargs redis-cli -p %s DEL >/dev/null")
      :format(PORT, PORT), { timeout = "10m" })
  end },
  { name = "floor", label = "floor: C hiredis SCAN + pipelined UNLINK (b)", fn = function()
    local out = proc.run({ FLOOR, "flush", PORT, "gemini:*", "1000" }).stdout
    return tonumber(out:match("in ([%d.]+) s"))
  end },
  { name = "rbe", label = "rbe: r:unlink_matching('gemini:*')", fn = function()
    local t0 = rbe.now()
    local n = r:unlink_matching("gemini:*", { count = 1000 })
    local secs = rbe.now() - t0
    assert(n == MATCH, "unlink_matching deleted " .. n)
    return secs
  end },
  { name = "rbe_loop", label = "rbe: for keys in r:scan{batch} do r:unlink end", fn = function()
    local t0 = rbe.now()
    for keys in r:scan { match = "gemini:*", count = 1000, batch = true } do
      r:unlink(table.unpack(keys))
    end
    return rbe.now() - t0
  end },
}

local results = {}
for _, m in ipairs(methods) do results[m.name] = { secs = {}, worst = {} } end
for _ = 1, REPEAT do
  for _, m in ipairs(methods) do
    fill()
    collectgarbage()
    local secs, worst = with_pinger(m.fn)
    check_deleted(m.name)
    local res = results[m.name]
    res.secs[#res.secs + 1] = secs
    res.worst[#res.worst + 1] = worst
  end
end

local function best(t) return math.min(table.unpack(t)) end
local function worst_of(t) return math.max(table.unpack(t)) end

print(("pattern delete: %d of %d keys match gemini:* (redis-server on 127.0.0.1:%s), best of %d"):format(
  MATCH, TOTAL, PORT, REPEAT))
local function runs(t, fmt)
  local o = {}
  for i, v in ipairs(t) do o[i] = fmt:format(v) end
  return table.concat(o, "/")
end

for _, m in ipairs(methods) do
  local res = results[m.name]
  res.best = best(res.secs)
  local sorted = { table.unpack(res.worst) }
  table.sort(sorted)
  res.median_ping = sorted[(#sorted + 1) // 2]
  res.max_ping = worst_of(res.worst)
  print(("  %-46s %6.3f s (runs %s)  %7.0f keys/s  worst PING per run %s ms")
    :format(m.label, res.best, runs(res.secs, "%.2f"), MATCH / res.best,
      runs(res.worst, "%.1f")))
end

local a, b, c, d = results.runbook, results.floor, results.rbe, results.rbe_loop
print(("  ratio runbook / rbe            = %.2fx (goal > 1: faster than the runbook)")
  :format(a.best / c.best))
print(("  ratio rbe / floor              = %.2fx (goal <= 1.2x)"):format(c.best / b.best))
print(("  ratio rbe plain loop / floor   = %.2fx"):format(d.best / b.best))
print(("  worst PING during rbe's flush  = %.1f ms median of runs, %.1f ms max (goal <= 10 ms; "
  .. "runbook: %.1f ms, floor: %.1f ms median)"):format(c.median_ping, c.max_ping,
  a.median_ping, b.median_ping))

---------------------------------------------------------------------------

r:flushall()
local function redis_benchmark(test)
  local out = proc.run({ "redis-benchmark", "-p", PORT, "-c", "1", "-P", "64",
    "-n", tostring(OPS), "-t", test, "-q" }, { timeout = "10m" }).stdout
  -- -q prints progress lines separated by \r, then "SET: 123.45 requests per second..."
  local rate = out:match(test:upper() .. ": ([%d.]+) requests per second[^\r]*$")
    or out:match(test:upper() .. ": ([%d.]+) requests per second")
  return tonumber(rate)
end

local function rbe_pipelined(cmd)
  local rounds = OPS // 64
  local t0 = rbe.now()
  if cmd == "SET" then
    for _ = 1, rounds do
      r:pipeline(function(p)
        for _ = 1, 64 do p:set("key:__rand_int__", "xxx") end
      end)
    end
  else
    for _ = 1, rounds do
      r:pipeline(function(p)
        for _ = 1, 64 do p:get("key:__rand_int__") end
      end)
    end
  end
  return rounds * 64 / (rbe.now() - t0)
end

print(("pipelined SET/GET, one connection, 64 commands per round trip, %d each, best of %d:")
  :format(OPS, REPEAT))
for _, cmd in ipairs { "SET", "GET" } do
  local base, mine = {}, {}
  for i = 1, REPEAT do
    base[i] = redis_benchmark(cmd:lower())
    collectgarbage()
    mine[i] = rbe_pipelined(cmd)
  end
  local function k(t)
    local o = {}
    for i, v in ipairs(t) do o[i] = v / 1000 end
    return runs(o, "%.0fk")
  end
  local bb, bm = math.max(table.unpack(base)), math.max(table.unpack(mine))
  print(("  %s  redis-benchmark -c 1 -P 64 %9.0f /s (%s)   rbe r:pipeline %9.0f /s (%s)   ratio %.2fx (goal >= 0.7x)")
    :format(cmd, bb, k(base), bm, k(mine), bm / bb))
end
r:flushall()
