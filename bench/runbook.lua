-- bench/runbook.lua RBE: the same 20-step runbook two ways against the same
-- local servers (a throwaway PostgreSQL and Redis, and the HTTP fixture):
--   baseline: a bash script of curl / psql / redis-cli calls, one process
--             per step (how runbooks are run by hand today);
--   rbe:      the same 20 steps as a playbook (`rbe run`, journal fsync'd),
--             one connection per server, reused.
-- Prints best-of-3 wall times and the ratio.
local rbe = require "rbe"
local proc = require "rbe.proc"
local fs = require "rbe.fs"

local RBE = arg[1]
local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")
local root = here .. "/.."
local dir = fs.tmpdir("rbe-bench-runbook-")
local servers = dir .. "/servers"

local env = {}
local function cleanup()
  proc.run({ root .. "/tests/fixtures/servers.sh", "stop", servers }, { check = false, timeout = "60s" })
  fs.remove(dir, { recursive = true, missing_ok = true })
end
local guard <close> = setmetatable({}, { __close = cleanup })

proc.run({ root .. "/tests/fixtures/servers.sh", "start", servers }, { timeout = "90s" })
for line in fs.read(servers .. "/env"):gmatch("[^\n]+") do
  local k, v = line:match("^([%w_]+)=(.*)$")
  if k then env[k] = v end
end
local httpd <close> = proc.spawn({ "node", root .. "/tests/fixtures/httpd.js" })
local port = tonumber(httpd:lines()():match('"http":%s*(%d+)'))
local url = ("http://127.0.0.1:%d/json"):format(port)
local pgurl, rport = env.RBE_TEST_PG_URL, env.RBE_TEST_REDIS_PORT

proc.run({ "psql", pgurl, "-qc", "create table items (id int primary key, v text); "
  .. "insert into items select g, 'v' || g from generate_series(1, 1000) g" })

local sh = { "#!/bin/bash", "set -e" }
for i = 1, 7 do sh[#sh + 1] = ("curl -sf %s > /dev/null"):format(url) end
for i = 1, 7 do sh[#sh + 1] = ("psql %q -Atqc 'select count(*) from items where id > %d' > /dev/null"):format(pgurl, i * 10) end
for i = 1, 6 do sh[#sh + 1] = ("redis-cli -p %s incr bench:counter > /dev/null"):format(rport) end
fs.write(dir .. "/runbook.sh", table.concat(sh, "\n") .. "\n", { mode = "0755" })

local steps = {}
for i = 1, 7 do steps[#steps + 1] = ('  pb.step "http %d" { run = function() http.get(%q) end },'):format(i, url) end
for i = 1, 7 do steps[#steps + 1] = ('  pb.step "sql %d" { run = function() return db():query("select count(*) from items where id > $1", %d)[1].count end },'):format(i, i * 10) end
for i = 1, 6 do steps[#steps + 1] = ('  pb.step "redis %d" { run = function() return r():incr("bench:counter") end },'):format(i) end
fs.write(dir .. "/runbook.lua", ([[
local pb = require "rbe.playbook"
local http = require "rbe.http"
local pg = require "rbe.pg"
local redis = require "rbe.redis"
local D, R
local function db() D = D or pg.connect(%q) return D end
local function r() R = R or redis.connect("redis://127.0.0.1:%s/0") return R end
return pb.playbook "runbook" {
%s
}
]]):format(pgurl, rport, table.concat(steps, "\n")))

local function best(argv, n)
  local b = math.huge
  for _ = 1, n do
    local t0 = rbe.now()
    proc.run(argv, { cwd = dir, env = { RBE_STATE_DIR = dir .. "/state" }, timeout = "5m" })
    b = math.min(b, rbe.now() - t0)
  end
  return b
end

local bash = best({ "bash", dir .. "/runbook.sh" }, 3)
local rbe_run = best({ RBE, "run", dir .. "/runbook.lua", "-q" }, 3)
print("20-step runbook (7 HTTP GETs, 7 SQL queries, 6 Redis commands), best of 3:")
print(("  bash: curl / psql / redis-cli per step  %8.1f ms"):format(bash * 1000))
print(("  rbe run playbook (journal fsync'd)      %8.1f ms"):format(rbe_run * 1000))
print(("  ratio bash / rbe = %.1fx (goal >= 10x)"):format(bash / rbe_run))
