-- bench/deploy.lua: the deploy-side modules against named baselines
-- measured in the same run (figures and ratios, never pass/fail):
--   error_rate  health.error_rate over a big log (a day of lines, a 5m
--               window): rbe reads the log backwards and stops at the
--               window; baselines: awk over the whole file (the shell
--               way of computing the same rate) and `grep -c ERROR`
--   notify      one message to 4 targets (Slack, PagerDuty alert and
--               change event, a webhook) on the local recorder:
--               notify.send (concurrent, one process) vs 4 curl calls in
--               a row (how a bash runbook posts)
--   vercel      promote + wait on the fake Vercel API with a 500 ms job:
--               the time above the job's own delay is rbe's polling
-- Sizes: DEPLOY_BENCH_LINES (default 500000), DEPLOY_BENCH_REPEAT (5).
local rbe = require "rbe"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local json = require "rbe.json"

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")
local root = here .. "/.."
package.path = root .. "/modules/?.lua;" .. package.path
local health = require "health"
local notify = require "notify"
local vercel = require "vercel"

local LINES = tonumber(os.getenv("DEPLOY_BENCH_LINES") or 500000)
local REPEAT = tonumber(os.getenv("DEPLOY_BENCH_REPEAT") or 5)
local dir = fs.tmpdir("rbe-bench-deploy-")
local guard <close> = setmetatable({}, { __close = function()
  fs.remove(dir, { recursive = true, missing_ok = true })
end })

local function best(n, f)
  local b = math.huge
  for _ = 1, n do
    local t0 = rbe.now()
    f()
    b = math.min(b, rbe.now() - t0)
  end
  return b
end

local function ms(s) return ("%.2f ms"):format(s * 1000) end

---------------------------------------------------------------------------
print(("-- error_rate: %d lines over 24h, window 5m (best of %d)"):format(LINES, REPEAT))
local log = dir .. "/app.log"
local now = os.time()
do
  local chunk, f = {}, assert(io.open(log, "wb"))
  for i = 1, LINES do
    local t = now - 86400 + 86400 * i / LINES
    chunk[#chunk + 1] = ("%s.%03dZ %s [app v2] GET /api/work-orders/%d 200 12ms\n"):format(
      os.date("!%Y-%m-%dT%H:%M:%S", math.floor(t)), i % 1000, i % 9 == 0 and "ERROR" or "INFO", i)
    if #chunk == 10000 then f:write(table.concat(chunk)); chunk = {} end
  end
  f:write(table.concat(chunk))
  f:close()
end
local size = fs.stat(log).size
local ev
local t_rbe = best(REPEAT, function()
  local _
  _, ev = health.error_rate { log = log, window = "5m", max = 0.05, now = now }
end)
local t_full = best(math.min(REPEAT, 3), function()
  health.error_rate { log = log, window = "25h", max = 0.05, now = now, max_bytes = size + 1 }
end)
local cutoff = os.date("!%Y-%m-%dT%H:%M:%S", now - 300)
local awk = ([[$1 >= "%s" { n++; if (index($0, "ERROR")) e++ } END { printf "%%d %%d\n", e, n }]])
  :format(cutoff)
local awk_out
local t_awk = best(math.min(REPEAT, 3), function()
  awk_out = proc.output { "awk", awk, log }
end)
local t_grep = best(math.min(REPEAT, 3), function()
  proc.run({ "grep", "-c", "ERROR", log }, { check = false })
end)
print(("log %.1f MB; rbe found %d errors in %d lines (awk: %s)"):format(size / 1e6, ev.errors,
  ev.total, awk_out))
print(("health.error_rate 5m window   %12s"):format(ms(t_rbe)))
print(("health.error_rate whole file  %12s"):format(ms(t_full)))
print(("awk over the whole file       %12s   rbe 5m is %.0fx faster"):format(ms(t_awk), t_awk / t_rbe))
print(("grep -c ERROR (no window)     %12s   rbe 5m is %.0fx faster"):format(ms(t_grep), t_grep / t_rbe))

---------------------------------------------------------------------------
print(("-- notify: one message to 4 targets (best of %d)"):format(REPEAT))
local rec <close> = proc.spawn({ "node", root .. "/tests/fixtures/recorder.js" })
local base = "http://127.0.0.1:" .. json.decode(rec:lines()()).http
local KEY = ("k"):rep(32)
local targets = {
  slack = { webhook = base .. "/slack/T/B/x" },
  pagerduty = { url = base, routing_key = KEY },
  pagerduty_change = { url = base, routing_key = KEY, all = true },
  webhook = { url = base .. "/hook" },
}
local msg = notify.message("started", { playbook = "bench", reason = "bench", run_id = "r1",
  user = "u", host = "h", budget = 900 })
notify.send(targets, msg, { required = true })   -- warm the connection pool
local t_send = best(REPEAT, function() notify.send(targets, msg, { required = true }) end)
local has_curl = proc.run({ "sh", "-c", "command -v curl" }, { check = false }).code == 0
if has_curl then
  local bodies = {
    { base .. "/slack/T/B/x", json.encode { text = msg.text, blocks = msg.blocks } },
    { base .. "/v2/enqueue", json.encode { routing_key = KEY, event_action = "trigger", dedup_key = "rbe-r1",
      payload = { summary = msg.summary, source = "h", severity = "warning" } } },
    { base .. "/v2/change/enqueue", json.encode { routing_key = KEY, payload = { summary = msg.summary } } },
    { base .. "/hook", json.encode(msg.fields) },
  }
  local t_curl = best(REPEAT, function()
    for _, b in ipairs(bodies) do
      proc.run { "curl", "-sf", "-o", "/dev/null", "-H", "Content-Type: application/json",
        "--data", b[2], b[1] }
    end
  end)
  print(("notify.send, 4 targets at once %11s"):format(ms(t_send)))
  print(("4 x curl in a row              %11s   rbe is %.1fx faster"):format(ms(t_curl), t_curl / t_send))
else
  print(("notify.send, 4 targets at once %11s   (no curl here: no baseline)"):format(ms(t_send)))
end

---------------------------------------------------------------------------
print("-- vercel: promote + wait, fake API with a 500 ms alias job")
local NOWMS = os.time() * 1000
local function dep(uid, days)
  return { uid = uid, name = "web", url = uid .. ".vercel.app", created = NOWMS - days * 86400000,
    readyState = "READY", target = "production", meta = {} }
end
fs.write(dir .. "/seed.json", json.encode { token = "bench-token", project = { id = "prj_b", name = "web" },
  aliases = { "web.example.com" }, production = "dpl_a",
  deployments = { dep("dpl_a", 1), dep("dpl_b", 2) } })
local fake <close> = proc.spawn({ "node", root .. "/drill/fake-vercel.js" },
  { env = { SEED_FILE = dir .. "/seed.json", PORT = "0", JOB_DELAY_MS = "500" } })
local vurl = "http://127.0.0.1:" .. fake:lines()():match("127%.0%.0%.1:(%d+)")
for _, poll in ipairs { "100ms", "250ms", "1s" } do
  local v <close> = vercel.client { token = "bench-token", base_url = vurl, poll = poll }
  local flip, worst, total = true, 0, 0
  for _ = 1, 3 do
    local t0 = rbe.now()
    v:promote("web", flip and "dpl_b" or "dpl_a")
    local d = rbe.now() - t0
    total, worst, flip = total + d, math.max(worst, d), not flip
  end
  print(("poll %-6s promote+wait mean %s, worst %s; above the 500 ms job: %s"):format(poll,
    ms(total / 3), ms(worst), ms(total / 3 - 0.5)))
end
