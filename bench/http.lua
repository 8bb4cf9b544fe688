-- bench/http.lua: rbe.http's throughput, run by bench_http.sh against a
-- small JSON /health on a private nginx.
--
--   rbe http.lua rate URL N CONC
--     N GETs of URL with CONC in flight: CONC tasks each calling http.get
--     in a loop (the way a playbook fans out), after a warm-up; prints the
--     rate in requests per second.  bench_http.sh alternates this with
--     the C floor, so both see the same machine.
--   rbe http.lua report URL N CONC WRK_RATE FLOOR_RATE RBE_RATE
--     measures the same N through rbe.parallel, and the runbook way, one
--     `curl` process per request through rbe.proc (sequentially, as a
--     runbook's loop runs them), then prints every figure and the ratios.
local rbe = require "rbe"
local http = require "rbe.http"
local proc = require "rbe.proc"

local mode, url = arg[1], arg[2]
local N = tonumber(arg[3] or 20000)
local CONC = tonumber(arg[4] or 64)
if (mode ~= "rate" and mode ~= "report") or not url then
  io.stderr:write("usage: http.lua rate URL N CONC | "
    .. "report URL N CONC WRK_RATE FLOOR_RATE RBE_RATE\n")
  os.exit(2)
end

-- CONC tasks sharing one counter; every response is checked
local function workers(n, conc)
  local left = n
  local tasks = {}
  local t0 = rbe.now()
  for i = 1, conc do
    tasks[i] = rbe.spawn(function()
      while left > 0 do
        left = left - 1
        local res = http.get(url)
        if res.status ~= 200 or res.body == "" then
          error("bad response " .. tostring(res))
        end
      end
    end)
  end
  for i = 1, conc do tasks[i]:join() end
  return n / (rbe.now() - t0)
end

if mode == "rate" then
  workers(2000, CONC)                      -- warm up: connections, pools
  print(("%.0f"):format(workers(N, CONC)))
  return
end

local wrk_rate, floor_rate, rbe_rate =
  tonumber(arg[5]), tonumber(arg[6]), tonumber(arg[7])
local CURL_N = tonumber(os.getenv("HTTP_CURL_N") or 200)

local fns = {}
for i = 1, N do fns[i] = function() return http.get(url).status end end
workers(2000, CONC)
local t0 = rbe.now()
local r = rbe.parallel(fns, { limit = CONC })
assert(r.n == N and r[N] == 200)
local par_rate = N / (rbe.now() - t0)
local body = #http.get(url).body
local after = http._stats()

-- the runbook way: one curl process per request
proc.run { "curl", "-sS", "-o", "/dev/null", url }
t0 = rbe.now()
for _ = 1, CURL_N do
  local c = proc.run { "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url }
  if c.stdout ~= "200" then error("curl: status " .. c.stdout) end
end
local curl_rate = CURL_N / (rbe.now() - t0)

local function line(what, rate, extra)
  print(("  %-36s %8.0f req/s%s"):format(what, rate, extra or ""))
end
print(("%d GETs of %s (%d-byte JSON), %d in flight:"):format(N, url, body, CONC))
line(("rbe http.get, %d tasks"):format(CONC), rbe_rate)
line(("rbe.parallel, limit %d"):format(CONC), par_rate)
line("C libcurl multi on libuv (floor)", floor_rate)
line(("wrk -c %d (the server's limit)"):format(CONC), wrk_rate)
line("one curl process per request", curl_rate,
  ("  (%.1f ms each, %d runs)"):format(1000 / curl_rate, CURL_N))
print(("  ratio rbe / C floor  = %.2fx  (goal >= 0.7x)"):format(rbe_rate / floor_rate))
print(("  ratio rbe / wrk      = %.2fx"):format(rbe_rate / wrk_rate))
print(("  ratio rbe / curl CLI = %.0fx  (goal >= 100x)"):format(rbe_rate / curl_rate))
print(("  after: %d easy handles (%d pooled), %d requests active, %d polls")
  :format(after.easy, after.pooled, after.active, after.polls))
