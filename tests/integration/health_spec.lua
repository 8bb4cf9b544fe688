-- modules/health.lua against real things: HTTP health endpoints and a
-- Prometheus instant query API served by tests/fixtures/recorder.js, the
-- fixture's PostgreSQL and Redis through rbe.pg / rbe.redis, and log
-- files written here.  Each check returns ok, evidence; failures are
-- values with a reason, unknown results (no data, monitoring down) are
-- marked so a trigger never fires on them; health.assert makes a gate
-- show the reason (checked through `rbe run`).
local rbe = require "rbe"
local http = require "rbe.http"
local json = require "rbe.json"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local support = require "support"
local health = require "health"

local RBE = support.rbe_bin()

local srv, base, tmp

local function respond(rule) srv:respond(rule) end

setup(function()
  srv = support.recorder()
  base = srv.base
end)

teardown(function()
  if srv then srv:close() end
end)

before_each(function()
  srv:reset()
  tmp = fs.tmpdir("rbe-health-")
end)

after_each(function()
  if tmp then fs.remove(tmp, { recursive = true }) end
end)

describe("#health http", function()
  it("passes on the expected status and JSON, with the latency", function()
    respond { path = "/health", body = { status = "ok", database = "healthy", redis = "ok", n = 3 } }
    local ok, ev = health.http(base .. "/health", { status = 200, json = { database = "healthy", n = 3 },
      max_ms = 5000 })
    assert.is_true(ok, ev.reason)
    assert.are.equal("http", ev.check)
    assert.are.equal(200, ev.status)
    assert.is_false(ev.unknown)
    assert.is_true(ev.ms >= 0 and ev.ms < 5000)
    assert.truthy(ev.reason:find("GET " .. base .. "/health -> 200 in ", 1, true), ev.reason)
    assert.truthy(ev.reason:match(" in %d+ ms$"), ev.reason)
  end)

  it("fails on a JSON field, a status or a slow answer, saying which", function()
    respond { path = "/health", body = { status = "degraded", database = "healthy" } }
    local ok, ev = health.http(base .. "/health", { json = { status = "ok" } })
    assert.is_false(ok)
    assert.truthy(ev.reason:find('json.status is "degraded", want "ok"', 1, true), ev.reason)
    respond { path = "/down", status = 503, body = { status = "down" } }
    ok, ev = health.http(base .. "/down", { status = 200 })
    assert.is_false(ok)
    assert.are.equal(503, ev.status)
    assert.truthy(ev.reason:find("-> 503, want 200", 1, true), ev.reason)
    respond { path = "/slow", delay_ms = 300, body = { status = "ok" } }
    ok, ev = health.http(base .. "/slow", { max_ms = 100 })
    assert.is_false(ok)
    assert.truthy(ev.ms >= 250, tostring(ev.ms))
    assert.truthy(ev.reason:find("over 100 ms", 1, true), ev.reason)
    ok, ev = health.http(base .. "/health", { json = { missing = { deep = 1 } } })
    assert.is_false(ok)
    assert.truthy(ev.reason:find("json.missing is missing, want an object", 1, true), ev.reason)
  end)

  it("an app that does not answer is a measured failure, not an unknown", function()
    local ok, ev = health.http("http://127.0.0.1:1/health", { timeout = "2s" })
    assert.is_false(ok)
    assert.is_false(ev.unknown)
    assert.truthy(ev.reason:find("CURLE_COULDNT_CONNECT", 1, true), ev.reason)
    assert.is_true((health.failed(ok, ev)))
  end)

  it("masks secrets of the URL in the evidence", function()
    respond { path = "/health", body = { status = "ok" } }
    local ok, ev = health.http(base .. "/health?token=s3cr3t-value", {})
    assert.is_true(ok)
    assert.falsy(ev.url:find("s3cr3t", 1, true))
    assert.falsy(ev.reason:find("s3cr3t", 1, true))
  end)

  it("health.assert raises a health error carrying the reason; misuse raises at once", function()
    respond { path = "/health", body = { status = "degraded" } }
    local err = support.raises(function()
      health.assert(health.http(base .. "/health", { json = { status = "ok" } }))
    end)
    assert.are.equal("health", err.kind)
    assert.are.equal("http", err.code)
    assert.truthy(tostring(err):find('json.status is "degraded"', 1, true))
    assert.truthy(tostring(support.raises(health.http, base, { stauts = 200 }))
      :find("unknown option 'stauts'", 1, true))
  end)

  it("in a gate: the reason of each failed poll is journaled until it passes", function()
    respond { path = "/health", body = { status = "ok" } }
    respond { path = "/health", body = { status = "degraded" }, times = 3 }
    local p = tmp .. "/gate.lua"
    fs.write(p, ([[
local pb = require "rbe.playbook"
local health = require "health"
return pb.playbook "gate" {
  pb.gate "app healthy" { every = "50ms", pass = 2, within = "20s",
    check = function(ctx) return health.assert(health.http(%q, { json = { status = "ok" } })) end },
}
]]):format(base .. "/health"))
    local r = proc.run({ RBE, "run", p, "--state-dir", tmp .. "/state" }, { check = false,
      timeout = "60s" })
    assert.are.equal(0, r.code, r.stderr)
    local id = fs.list(tmp .. "/state/runs")[1]
    local polls = {}
    for l in fs.lines(tmp .. "/state/runs/" .. id .. "/journal.jsonl") do
      local ev = json.decode(l)
      if ev.ev == "gate_poll" then polls[#polls + 1] = ev end
    end
    assert.are.equal(5, #polls)
    for i = 1, 3 do
      assert.is_false(polls[i].ok)
      assert.truthy(polls[i].error:find('json.status is "degraded", want "ok"', 1, true), polls[i].error)
    end
    assert.is_true(polls[5].ok)
    assert.are.equal(2, polls[5].streak)
  end)
end)

describe("#health error_rate", function()
  local NOW = 1800000000   -- a fixed "now": 2027-01-15T08:00:00Z

  local function stamp(t)
    return os.date("!%Y-%m-%dT%H:%M:%S", math.floor(t)) .. (".%03dZ"):format(math.floor(t % 1 * 1000))
  end

  -- n lines spread over `span` seconds before NOW, every k-th an ERROR
  local function log_lines(n, span, k, from)
    local out = {}
    for i = 1, n do
      local t = (from or NOW) - span + span * i / n
      local level = (k and i % k == 0) and "ERROR" or "INFO"
      out[#out + 1] = ("%s %s [app] request %d handled\n"):format(stamp(t), level, i)
    end
    return table.concat(out)
  end

  it("counts the window's lines and those matching the pattern", function()
    local log = tmp .. "/app.log"
    -- an hour of old errors, then 5 minutes at 10%
    fs.write(log, log_lines(600, 3600, 1, NOW - 600) .. log_lines(200, 290, 10))
    local ok, ev = health.error_rate { log = log, window = "5m", max = 0.05, now = NOW }
    assert.is_false(ok)
    assert.are.equal(200, ev.total)
    assert.are.equal(20, ev.errors)
    assert.are.equal(0.1, ev.rate)
    assert.are.equal(4, ev.per_minute)
    assert.are.equal("error rate 10% (20 of 200 lines in 300s) > 5%", ev.reason)
    assert.is_true((health.failed(ok, ev)))
    ok, ev = health.error_rate { log = log, window = "5m", max = 0.2, now = NOW }
    assert.is_true(ok, ev.reason)
    ok, ev = health.error_rate { log = log, window = "5m", max_count = 10, now = NOW }
    assert.is_false(ok)
    assert.truthy(ev.reason:find("20 matching lines in 300s > 10", 1, true), ev.reason)
  end)

  it("reads a big log backwards across block boundaries", function()
    local log = tmp .. "/big.log"
    fs.write(log, log_lines(20000, 7200, nil, NOW - 301) .. log_lines(3000, 299, 3))
    assert.truthy(fs.stat(log).size > 4 * 65536)
    local ok, ev = health.error_rate { log = log, window = "5m", max = 0.5, now = NOW }
    assert.is_true(ok, ev.reason)
    assert.are.equal(3000, ev.total)
    assert.are.equal(1000, ev.errors)
  end)

  it("understands zone offsets, local times, brackets and a custom time function", function()
    local log = tmp .. "/zones.log"
    local t = NOW - 60
    fs.write(log, table.concat {
      os.date("!%Y-%m-%dT%H:%M:%S", NOW - 4000) .. "Z ERROR old\n",
      os.date("!%Y-%m-%dT%H:%M:%S", t + 3600) .. "+01:00 ERROR a\n",
      "[" .. os.date("!%Y-%m-%d %H:%M:%S", t) .. "Z] ERROR b\n",
      os.date("%Y-%m-%dT%H:%M:%S", t) .. " INFO c (local time)\n",
      "    at stack frame (no timestamp)\n",
    })
    local ok, ev = health.error_rate { log = log, window = "5m", max = 0.5, now = NOW }
    assert.are.equal(3, ev.total)
    assert.are.equal(2, ev.errors)
    assert.is_false(ok)
    local custom = tmp .. "/custom.log"
    fs.write(custom, ("%d ok z\n%d ERROR x\n%d ok y\n"):format(NOW - 1000, NOW - 10, NOW - 5))
    ok, ev = health.error_rate { log = custom, window = "1m", max = 0.6, now = NOW,
      time = function(line) return tonumber(line:match("^(%d+) ")) end }
    assert.is_true(ok, ev.reason)
    assert.are.equal(2, ev.total)
    assert.are.equal(1, ev.errors)
  end)

  it("a missing log, a log without timestamps and an empty window are unknown", function()
    local ok, ev = health.error_rate { log = tmp .. "/nope.log", max = 0.05 }
    assert.is_false(ok)
    assert.is_true(ev.unknown)
    assert.truthy(ev.reason:find("cannot read the log", 1, true))
    assert.is_false((health.failed(ok, ev)))
    fs.write(tmp .. "/plain.log", "ERROR one\nERROR two\n")
    ok, ev = health.error_rate { log = tmp .. "/plain.log", max = 0.05 }
    assert.is_true(ev.unknown)
    assert.truthy(ev.reason:find("time = function", 1, true), ev.reason)
    fs.write(tmp .. "/old.log", log_lines(10, 60, 1, NOW - 3600))
    ok, ev = health.error_rate { log = tmp .. "/old.log", max = 0.05, now = NOW }
    assert.is_true(ev.unknown)
    assert.are.equal(0, ev.total)
    assert.truthy(ev.reason:find("fewer than min_lines 1", 1, true), ev.reason)
    assert.truthy(tostring(support.raises(health.error_rate, { log = "x" })):find("give max", 1, true))
  end)
end)

describe("#health prometheus", function()
  local function vector(...)
    local result = json.array()
    for _, s in ipairs { ... } do
      result[#result + 1] = { metric = s[1], value = { 1800000000.5, tostring(s[2]) } }
    end
    return { status = "success", data = { resultType = "vector", result = result } }
  end

  it("checks an instant query against a threshold (error rate > 5%, p95 < 300 ms)", function()
    local q1 = 'sum(rate(http_requests_total{code=~"5.."}[5m])) / sum(rate(http_requests_total[5m]))'
    local q2 = 'histogram_quantile(0.95, sum(rate(http_request_duration_seconds_bucket[5m])) by (le))'
    respond { path = "/api/v1/query", query = { query = q1 }, body = vector { {}, 0.125 } }
    respond { path = "/api/v1/query", query = { query = q2 }, body = vector { {}, 0.25 } }
    local ok, ev = health.prometheus { url = base, query = q1, max = 0.05 }
    assert.is_false(ok)
    assert.is_false(ev.unknown)
    assert.are.equal(0.125, ev.value)
    assert.truthy(ev.reason:find("{} = 0.125, want <= 0.05", 1, true), ev.reason)
    assert.is_true((health.failed(ok, ev)))
    ok, ev = health.prometheus { url = base .. "/", query = q2, max = 0.3 }
    assert.is_true(ok, ev.reason)
    assert.are.equal(0.25, ev.value)
    local got = http.get(base .. "/_requests"):json().requests
    assert.are.equal("/api/v1/query", got[1].path)
    assert.are.equal(q1, got[1].query.query)
    assert.are.equal(q2, got[2].query.query)
  end)

  it("every series must be within bounds; scalars work", function()
    respond { path = "/api/v1/query", query = { query = "up" }, body = vector(
      { { job = "api", instance = "a" }, 1 }, { { job = "api", instance = "b" }, 0 }) }
    local ok, ev = health.prometheus { url = base, query = "up", min = 1 }
    assert.is_false(ok)
    assert.are.equal(2, ev.count)
    assert.truthy(ev.reason:find('{instance="b",job="api"} = 0, want >= 1', 1, true), ev.reason)
    respond { path = "/api/v1/query", query = { query = "scalar(1)" },
      body = { status = "success", data = { resultType = "scalar", result = { 1800000000, "1" } } } }
    ok, ev = health.prometheus { url = base, query = "scalar(1)", min = 0.5, max = 2 }
    assert.is_true(ok, ev.reason)
  end)

  it("no data, a failed query and an unreachable Prometheus are unknown", function()
    local ok, ev = health.prometheus { url = base, query = "absent_metric", max = 1 }
    assert.is_false(ok)
    assert.is_true(ev.unknown)
    assert.truthy(ev.reason:find("no data", 1, true))
    assert.is_false((health.failed(ok, ev)))
    respond { path = "/api/v1/query", status = 400,
      body = { status = "error", errorType = "bad_data", error = "parse error at char 5" } }
    ok, ev = health.prometheus { url = base, query = "rate(", max = 1 }
    assert.is_true(ev.unknown)
    assert.truthy(ev.reason:find("bad_data", 1, true), ev.reason)
    ok, ev = health.prometheus { url = "http://127.0.0.1:1", query = "up", max = 1, timeout = "2s" }
    assert.is_true(ev.unknown)
    assert.truthy(ev.reason:find("did not answer", 1, true), ev.reason)
  end)
end)

describe("#health #pg postgres", function()
  local pg_ok, pg = pcall(require, "rbe.pg")
  local db, schema

  before_each(function()
    assert(pg_ok, "rbe.pg does not load: " .. tostring(pg))
    db = pg.connect(rbe.env "RBE_TEST_PG_URL")
    schema = "health_spec_" .. rbe.whoami().pid
    db:query("drop schema if exists " .. schema .. " cascade")
    db:query("create schema " .. schema)
    db:query("create table " .. schema .. ".work_orders (id int primary key, photo boolean)")
    db:query("insert into " .. schema .. ".work_orders select g, g % 4 = 0 from generate_series(1, 40) g")
  end)

  after_each(function()
    if db then
      pcall(db.query, db, "drop schema if exists " .. schema .. " cascade")
      db:close()
    end
  end)

  it("select 1, tables that must (not) exist and row counts", function()
    local ok, ev = health.pg(db, {
      exists = { schema .. ".work_orders" }, missing = { schema .. ".message_attachments" },
      counts = { [schema .. ".work_orders"] = 40 },
    })
    assert.is_true(ok, ev.reason)
    assert.are.equal(40, ev.counts[schema .. ".work_orders"])
    assert.is_true(ev.tables[schema .. ".work_orders"])
    assert.is_false(ev.tables[schema .. ".message_attachments"])
    ok, ev = health.pg(db, {
      exists = { schema .. ".message_attachments" }, missing = { schema .. ".work_orders" },
      counts = { photos = { table = schema .. ".work_orders", where = "photo", max = 5 } },
    })
    assert.is_false(ok)
    assert.truthy(ev.reason:find("table " .. schema .. ".message_attachments does not exist", 1, true), ev.reason)
    assert.truthy(ev.reason:find("table " .. schema .. ".work_orders still exists", 1, true), ev.reason)
    assert.truthy(ev.reason:find("work_orders where photo has 10 rows, want at most 5", 1, true), ev.reason)
  end)

  it("a closed connection is a failure with the driver's reason", function()
    local ok, ev = health.pg(db, {})
    assert.is_true(ok, ev.reason)
    local other = pg.connect(rbe.env "RBE_TEST_PG_URL")
    other:close()
    ok, ev = health.pg(other, {})
    assert.is_false(ok)
    assert.truthy(ev.reason:find("^postgres: "), ev.reason)
    assert.is_string(ev.error)
  end)
end)

describe("#health #redis redis", function()
  local redis_ok, redis = pcall(require, "rbe.redis")

  it("PING answers PONG; a closed connection fails", function()
    assert(redis_ok, "rbe.redis does not load: " .. tostring(redis))
    local r = redis.connect(rbe.env "RBE_TEST_REDIS_URL")
    local ok, ev = health.redis(r, { max_ms = 5000 })
    assert.is_true(ok, ev.reason)
    assert.are.equal("PONG", ev.reply)
    r:close()
    ok, ev = health.redis(r)
    assert.is_false(ok)
    assert.truthy(ev.reason:find("^redis: PING failed"), ev.reason)
  end)
end)
