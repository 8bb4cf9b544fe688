-- modules/queue.lua against the fixture's redis-server and the real npm
-- packages: the key layouts of each library (BullMQ 6, and the layouts of
-- BullMQ 5/4 built by hand, since only the current bullmq is installed),
-- then a real Node producer + worker (tests/fixtures/bull_worker.js) on
-- `bullmq` and on `bull`: while rbe holds the queue paused no job is taken
-- although jobs keep coming, and after the resume every job is processed
-- exactly once.  The library's own pause/resume and rbe's interoperate;
-- the HTTP pause routes and bull-board's API drive the same worker; the
-- ready-made steps run in real playbooks (`rbe run`, `rbe plan`).  Every
-- key lives under a per-run prefix, removed at the end.
local rbe = require "rbe"
local redis = require "rbe.redis"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local queue = require "queue"
require "rbe.http"    -- opens libcurl's multi handle (2 fds) before the first test

local URL = rbe.env("RBE_TEST_REDIS_URL")
local P = ("rbeq%d%d"):format(os.time() % 100000, math.random(1, 1e6))
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local ROOT = HERE .. "/../.."
local FIXTURE = ROOT .. "/tests/fixtures/bull_worker.js"
local NODE_PATH = ROOT .. "/tests/fixtures/node/node_modules"
local RBE = os.getenv("RBE_BIN") or (ROOT .. "/build/bin/rbe")

local function raises(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return err
end

local function wait_until(f, secs, what)
  local deadline = rbe.now() + (secs or 10)
  while rbe.now() < deadline do
    if f() then return true end
    rbe.sleep(0.02)
  end
  error("timed out waiting for " .. (what or "a condition"))
end

-- r: a connection of the running test (the helper counts handles after
-- each test, so none stays open between tests)
local r

local busted_it = it
local function it(name, fn)
  busted_it(name, function()
    r = redis.connect(URL)
    local ok, err = pcall(fn)
    r:close()
    r = nil
    if not ok then error(err, 0) end
  end)
end

setup(function()
  -- the npm packages are installed by `make deps`; a hand run may need them
  if not fs.exists(NODE_PATH .. "/bullmq/package.json") then
    proc.run({ ROOT .. "/tests/fixtures/npm-install.sh" }, { timeout = "5m" })
  end
end)

teardown(function()
  local c <close> = redis.connect(URL)
  c:unlink_matching(P .. "*")
end)

local n = 0
local function qname()
  n = n + 1
  return "q" .. n
end

local function key(q, t) return P .. ":" .. q .. ":" .. t end

---------------------------------------------------------------------------

describe("#redis queue layouts", function()
  it("bullmq6: pause keeps jobs in wait, sets meta.paused, drops the marker, emits paused", function()
    local name = qname()
    r:hset(key(name, "meta"), "version", "bullmq:6.7.0", "opts.maxLenEvents", 10000)
    r:lpush(key(name, "wait"), "3", "2", "1")
    r:zadd(key(name, "marker"), 0, "0")
    local q = queue.open(r, name, { prefix = P })
    local st = q:pause()
    assert.are.equal("bullmq6", st.layout)
    assert.are.equal("bullmq:6.7.0", st.version)
    assert.is_false(st.was_paused)
    assert.is_true(st.paused)
    assert.are.same({ "1", "2", "3" }, r:lrange(key(name, "wait"), 0, -1))
    assert.are.equal(0, r:exists(key(name, "paused")))
    assert.are.equal("1", r:hget(key(name, "meta"), "paused"))
    assert.are.equal(0, r:exists(key(name, "marker")))
    local ev = r:xrange(key(name, "events"), "-", "+")
    assert.are.same({ "event", "paused" }, ev[#ev][2])
    assert.are.equal(3, q:status().waiting)

    -- producers keep adding to wait while paused; resume sets the marker
    r:lpush(key(name, "wait"), "4")
    st = q:resume()
    assert.is_true(st.was_paused)
    assert.is_false(st.paused)
    assert.are.equal(0, r:hexists(key(name, "meta"), "paused"))
    assert.are.same({ "0" }, r:zrange(key(name, "marker"), 0, -1))
    assert.are.same({ "4", "1", "2", "3" }, r:lrange(key(name, "wait"), 0, -1))
    ev = r:xrange(key(name, "events"), "-", "+")
    assert.are.same({ "event", "resumed" }, ev[#ev][2])
  end)

  it("bullmq6: resume moves a legacy paused list back into wait, older jobs first out", function()
    local name = qname()
    r:hset(key(name, "meta"), "version", "bullmq:6.7.0", "paused", 1)
    r:lpush(key(name, "paused"), "2", "1")     -- paused by an older version
    r:lpush(key(name, "wait"), "4", "3")       -- added since
    local st = queue.resume(r, name, { prefix = P })
    assert.are.equal(2, st.moved)
    assert.are.same({ "3", "4", "1", "2" }, r:lrange(key(name, "wait"), 0, -1))
    assert.are.equal(0, r:exists(key(name, "paused")))
  end)

  it("bullmq6: an empty queue with a delayed job gets the delayed marker on resume", function()
    local name = qname()
    r:hset(key(name, "meta"), "version", "bullmq:6.7.0", "paused", 1)
    r:zadd(key(name, "delayed"), 1700000000000 * 0x1000, "9")
    queue.resume(r, name, { prefix = P })
    local m = r:zrange(key(name, "marker"), 0, -1, "WITHSCORES")
    assert.are.same({ "1", "1700000000000" }, m)
  end)

  it("bullmq5: pause renames wait to paused; resume merges what producers added", function()
    local name = qname()
    r:hset(key(name, "meta"), "version", "bullmq:5.12.0")
    r:lpush(key(name, "wait"), "3", "2", "1")
    r:zadd(key(name, "marker"), 0, "0")
    local st = queue.pause(r, name, { prefix = P })
    assert.are.equal("bullmq5", st.layout)
    assert.are.equal(3, st.moved)
    assert.are.equal(0, r:exists(key(name, "wait")))
    assert.are.same({ "1", "2", "3" }, r:lrange(key(name, "paused"), 0, -1))
    assert.are.equal("1", r:hget(key(name, "meta"), "paused"))
    assert.are.equal(0, r:exists(key(name, "marker")))
    -- BullMQ 5 producers add to `paused` while paused; a stray job in wait
    -- (added by a newer client) must not be lost either
    r:lpush(key(name, "paused"), "4")
    r:lpush(key(name, "wait"), "5")
    st = queue.resume(r, name, { prefix = P })
    assert.is_true(st.was_paused)
    assert.are.same({ "5", "4", "1", "2", "3" }, r:lrange(key(name, "wait"), 0, -1))
    assert.are.equal(0, r:exists(key(name, "paused")))
    assert.are.same({ "0" }, r:zrange(key(name, "marker"), 0, -1))
  end)

  it("bullmq4: resume puts a 0:0 marker in wait when only prioritized jobs wait", function()
    local name = qname()
    r:hset(key(name, "meta"), "version", "bullmq:4.17.0")
    r:zadd(key(name, "prioritized"), 5, "7")
    queue.pause(r, name, { prefix = P })
    assert.are.equal(0, r:exists(key(name, "marker")))
    local st = queue.resume(r, name, { prefix = P })
    assert.are.equal("bullmq4", st.layout)
    assert.are.same({ "0:0" }, r:lrange(key(name, "wait"), 0, -1))
    assert.are.equal(1, st.prioritized)
    assert.are.equal(0, r:exists(key(name, "marker")))
  end)

  it("BullMQ keys without a version are handled as bullmq5; a forced layout wins", function()
    local name = qname()
    r:hset(key(name, "meta"), "opts.maxLenEvents", 10000)
    r:xadd(key(name, "events"), "*", "event", "waiting")
    r:lpush(key(name, "wait"), "1")
    local st = queue.status(r, name, { prefix = P })
    assert.are.equal("bullmq5", st.layout)
    assert.is_nil(st.version)
    st = queue.open(r, name, { prefix = P, layout = "bullmq6" }):pause()
    assert.are.equal("bullmq6", st.layout)
    assert.are.equal(1, r:llen(key(name, "wait")))
    local err = raises(queue.open, r, name, { prefix = P, layout = "bullmq7" })
    assert.truthy(tostring(err):find("unknown layout 'bullmq7'", 1, true))
  end)

  it("bull: RENAME, meta-paused and meta.paused, PUBLISH on Bull's channels", function()
    local name = qname()
    r:set(key(name, "id"), 3)
    r:lpush(key(name, "wait"), "3", "2", "1")
    local sub <close> = r:subscribe(key(name, "paused"), key(name, "resumed"))
    local st = queue.pause(r, name, { prefix = P })
    assert.are.equal("bull", st.layout)
    assert.are.equal("1", r:get(key(name, "meta-paused")))
    assert.are.equal("1", r:hget(key(name, "meta"), "paused"))
    assert.are.same({ "1", "2", "3" }, r:lrange(key(name, "paused"), 0, -1))
    local msg = sub:next(5)
    assert.are.same({ key(name, "paused"), "paused" }, { msg.channel, msg.payload })
    -- still Bull while paused (meta-paused is there), and still paused
    st = queue.status(r, name, { prefix = P })
    assert.are.equal("bull", st.layout)
    assert.is_true(st.paused)
    assert.are.equal(3, st.waiting)
    queue.resume(r, name, { prefix = P })
    assert.are.equal(0, r:exists(key(name, "meta-paused")))
    assert.are.equal(0, r:hexists(key(name, "meta"), "paused"))
    assert.are.same({ "1", "2", "3" }, r:lrange(key(name, "wait"), 0, -1))
    msg = sub:next(5)
    assert.are.same({ key(name, "resumed"), "resumed" }, { msg.channel, msg.payload })
  end)

  it("pausing twice and resuming a running queue change nothing and emit nothing", function()
    local name = qname()
    r:hset(key(name, "meta"), "version", "bullmq:6.7.0")
    r:lpush(key(name, "wait"), "1")
    queue.pause(r, name, { prefix = P })
    local st = queue.pause(r, name, { prefix = P })
    assert.is_true(st.was_paused)
    assert.are.equal(1, r:xlen(key(name, "events")))
    queue.resume(r, name, { prefix = P })
    st = queue.resume(r, name, { prefix = P })
    assert.is_false(st.was_paused)
    assert.are.equal(2, r:xlen(key(name, "events")))
  end)

  it("an unknown queue is an ENOQUEUE error, never a silent no-op", function()
    local err = raises(queue.pause, r, "no-such-queue", { prefix = P })
    assert.are.equal("queue", err.kind)
    assert.are.equal("ENOQUEUE", err.code)
    assert.truthy(err.message:find(P .. ":no-such-queue", 1, true))
    assert.are.equal(0, r:exists(key("no-such-queue", "meta")))
  end)

  it("status counts every state; list finds the queues under a prefix", function()
    local name = qname()
    r:hset(key(name, "meta"), "version", "bullmq:6.7.0")
    r:lpush(key(name, "wait"), "1", "2")
    r:lpush(key(name, "active"), "3")
    r:zadd(key(name, "prioritized"), 1, "4")
    r:zadd(key(name, "delayed"), 1, "5", 2, "6")
    r:zadd(key(name, "failed"), 1, "7")
    r:zadd(key(name, "completed"), 1, "8", 2, "9", 3, "10")
    local st = queue.open(r, name, { prefix = P }):status()
    assert.are.same({ false, 3, 1, 2, 1, 3, 1 }, { st.paused, st.waiting, st.active,
      st.delayed, st.failed, st.completed, st.prioritized })
    local names = queue.list(r, { prefix = P })
    assert.truthy(#names >= n - 1)
    local set = {}
    for _, x in ipairs(names) do set[x] = true end
    assert.is_true(set[name])
  end)

  it("wait_idle returns once nothing is active and times out with the count", function()
    local name = qname()
    r:hset(key(name, "meta"), "version", "bullmq:6.7.0")
    r:lpush(key(name, "active"), "1", "2")
    local q = queue.open(r, name, { prefix = P })
    local err = raises(q.wait_idle, q, { timeout = "150ms", poll = "20ms" })
    assert.are.equal("timeout", err.kind)
    assert.are.equal(2, err.active)
    assert.truthy(err.message:find("2 job(s) still active", 1, true))
    local t = rbe.spawn(function()
      rbe.sleep(0.1)
      r:del(key(name, "active"))
    end)
    local st = queue.wait_idle(q, { timeout = "5s", poll = "20ms" })
    assert.are.equal(0, st.active)
    assert.is_true(st.waited >= 0.05)
    t:join()
  end)

  it("misuse is a plain error naming the function", function()
    assert.truthy(tostring(raises(queue.open, nil, "x")):find("queue.open: an rbe.redis client"))
    assert.truthy(tostring(raises(queue.open, r, "")):find("queue name expected"))
    assert.truthy(tostring(raises(queue.open, r, "x", { prefx = "a" })):find("unknown option 'prefx'"))
    assert.truthy(tostring(raises(queue.pause_step, { queues = "a" })):find("redis is required"))
    assert.truthy(tostring(raises(queue.pause_step, { redis = URL, queues = "a", drian = 1 }))
      :find("unknown option 'drian'"))
  end)
end)

---------------------------------------------------------------------------
-- real Node workers

local function start_worker(lib, name, extra)
  local env = { NODE_PATH = NODE_PATH, LIB = lib, REDIS_URL = URL, QUEUE = name,
    PREFIX = P, NS = P .. ":ns:" .. name, CONCURRENCY = "2", PRODUCE_MS = "10",
    WORK_MS = "15" }
  for k, v in pairs(extra or {}) do env[k] = v end
  local child = proc.spawn({ "node", FIXTURE, "run" }, { env = env, kill_grace = "3s" })
  local line = child:lines()()
  if not line then
    local res = child:wait()
    error("bull_worker.js did not start: " .. tostring(res.stderr))
  end
  return child, line:match('"http":(%d+)')
end

local function lib_call(lib, name, action)
  local out = proc.output({ "node", FIXTURE, action }, { env = { NODE_PATH = NODE_PATH,
    LIB = lib, REDIS_URL = URL, QUEUE = name, PREFIX = P }, timeout = "20s" })
  return out:find('"paused":true', 1, true) ~= nil
end

local function ns(name, t) return P .. ":ns:" .. name .. ":" .. t end

-- every produced job processed exactly once, each taken once
local function assert_exactly_once(name)
  r:set(ns(name, "stop"), 1)
  wait_until(function()
    return r:scard(ns(name, "produced")) > 0
       and #r:sdiff(ns(name, "produced"), ns(name, "processed")) == 0
       and queue.status(r, name, { prefix = P }).active == 0
  end, 20, "every job to be processed")
  local produced = r:scard(ns(name, "produced"))
  assert.are.equal(produced, r:scard(ns(name, "processed")))
  assert.are.equal(produced, r:llen(ns(name, "taken")))
  assert.are.equal(0, r:exists(ns(name, "duplicates")))
  return produced
end

for _, lib in ipairs { "bullmq", "bull" } do
  describe("#redis #node " .. lib .. " worker", function()
    it("takes no job while rbe holds the queue paused; every job runs exactly once", function()
      local name = qname()
      local w <close> = start_worker(lib, name)
      wait_until(function() return r:scard(ns(name, "processed")) >= 10 end, 10,
        "the worker to process jobs")

      local st = queue.pause(r, name, { prefix = P })
      assert.are.equal(lib == "bull" and "bull" or "bullmq6", st.layout)
      assert.is_false(st.was_paused)
      st = queue.wait_idle(r, name, { prefix = P, timeout = "10s" })
      local taken = r:llen(ns(name, "taken"))
      local produced = r:scard(ns(name, "produced"))
      wait_until(function() return r:get(ns(name, "lib_paused")) == "1" end, 5,
        "the library to see the queue paused")

      rbe.sleep(0.8)                          -- jobs keep coming meanwhile
      assert.are.equal(taken, r:llen(ns(name, "taken")), "a job was taken while paused")
      local added = r:scard(ns(name, "produced")) - produced
      assert.is_true(added >= 10, "only " .. added .. " jobs added while paused")
      st = queue.status(r, name, { prefix = P })
      assert.is_true(st.paused)
      assert.are.equal(0, st.active)
      assert.is_true(st.waiting >= added)
      if lib == "bull" then
        assert.are.equal(0, r:exists(key(name, "wait")))
        assert.is_true(r:llen(key(name, "paused")) >= added)
      else
        assert.are.equal(0, r:exists(key(name, "paused")))
        assert.is_true(r:llen(key(name, "wait")) >= added)
      end

      st = queue.resume(r, name, { prefix = P })
      assert.is_true(st.was_paused)
      wait_until(function() return r:llen(ns(name, "taken")) > taken end, 10,
        "the worker to take jobs again")
      wait_until(function() return r:get(ns(name, "lib_paused")) == "0" end, 5,
        "the library to see the queue running")
      rbe.sleep(0.2)
      assert.is_true(assert_exactly_once(name) >= produced + added)
    end)

    it("interoperates with the library's own pause and resume", function()
      local name = qname()
      local w <close> = start_worker(lib, name)
      wait_until(function() return r:scard(ns(name, "processed")) >= 5 end, 10, "jobs")
      -- paused by the library, seen and resumed by rbe
      assert.is_true(lib_call(lib, name, "pause"))
      assert.is_true(queue.status(r, name, { prefix = P }).paused)
      local st = queue.resume(r, name, { prefix = P })
      assert.is_true(st.was_paused)
      assert.is_false(lib_call(lib, name, "ispaused"))
      -- paused by rbe, seen and resumed by the library
      queue.pause(r, name, { prefix = P })
      assert.is_true(lib_call(lib, name, "ispaused"))
      assert.is_false(lib_call(lib, name, "resume"))
      assert.is_false(queue.status(r, name, { prefix = P }).paused)
      assert_exactly_once(name)
    end)
  end)
end

---------------------------------------------------------------------------
-- HTTP endpoints (the fixture serves an app's routes and bull-board's API)

describe("#redis #node queue over HTTP", function()
  local function ctx()
    return { results = {}, step = "s", log = function() end, vars = {} }
  end

  it("http_pause_step calls the pause route; undo calls the resume route", function()
    local name = qname()
    local w <close>, port = start_worker("bullmq", name, { HTTP = "1" })
    local base = "http://127.0.0.1:" .. port
    local spec = queue.http_pause_step { pause = base .. "/api/queue/pause-all",
      resume = { url = base .. "/api/queue/resume-all" } }
    local c = ctx()
    local plan = spec.plan(c)
    assert.truthy(plan[1]:find("would POST " .. base .. "/api/queue/pause-all", 1, true))
    c.results.s = spec.run(c)
    assert.are.equal(200, c.results.s.status)
    assert.is_true(queue.status(r, name, { prefix = P }).paused)
    spec.undo(c)
    assert.is_false(queue.status(r, name, { prefix = P }).paused)
    assert_exactly_once(name)
  end)

  it("bull_board_step pauses through bull-board and resumes only what ran before", function()
    local name = qname()
    local w <close>, port = start_worker("bullmq", name, { HTTP = "1" })
    local base = "http://127.0.0.1:" .. port
    local b = queue.bull_board(base)
    assert.are.same({ { name = name, paused = false } }, (function()
      local l = b:queues()
      l[1].counts = nil
      return l
    end)())
    local spec = queue.bull_board_step { url = base, queues = { name } }
    local c = ctx()
    assert.truthy(spec.plan(c)[1]:find("would pause " .. name, 1, true))
    c.results.s = spec.run(c)
    assert.are.same({ name }, c.results.s.paused)
    assert.is_true(queue.status(r, name, { prefix = P }).paused)
    -- a second run finds it paused: its undo must leave it paused
    local c2 = ctx()
    c2.results.s = spec.run(c2)
    assert.are.same({ name }, c2.results.s.already_paused)
    spec.undo(c2)
    assert.is_true(queue.status(r, name, { prefix = P }).paused)
    spec.undo(c)
    assert.is_false(queue.status(r, name, { prefix = P }).paused)
    local err = raises(queue.bull_board_step { url = base, queues = { "nope" } }.run, ctx())
    assert.are.equal("ENOQUEUE", err.code)
    assert_exactly_once(name)
  end)
end)

---------------------------------------------------------------------------
-- the steps inside real playbooks

describe("#redis queue steps in playbooks", function()
  local dir
  before_each(function() dir = fs.tmpdir("rbe-queue-spec-") end)
  after_each(function() fs.remove(dir, { recursive = true }) end)

  local function playbook(body)
    local path = dir .. "/book.lua"
    fs.write(path, ([[
local rbe = require "rbe"
local pb = require "rbe.playbook"
local queue = require "queue"
return pb.playbook "queue spec" {
  %s
}
]]):format(body))
    return path
  end

  local function rbe_cli(args)
    local argv = { RBE }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    return proc.run(argv, { check = false, timeout = "60s",
      env = { QSPEC_REDIS = URL, QSPEC_PREFIX = P } })
  end

  it("a failure later undoes the pause of the queues that were running only", function()
    local a, b = qname(), qname()
    for _, x in ipairs { a, b } do
      r:hset(key(x, "meta"), "version", "bullmq:6.7.0")
      r:lpush(key(x, "wait"), "1")
    end
    queue.pause(r, b, { prefix = P })
    local book = playbook(([[
  pb.step "pause queues" (queue.pause_step { redis = rbe.env "QSPEC_REDIS",
    queues = { %q, %q }, prefix = rbe.env "QSPEC_PREFIX", drain = "5s" }),
  pb.step "migrate" { run = function() error("migration failed") end },
]]):format(a, b))
    local plan = rbe_cli { "plan", book }
    assert.are.equal(0, plan.code, plan.stderr)
    assert.truthy(plan.stdout:find("would pause running " .. key(a, ""):sub(1, -2), 1, true), plan.stdout)
    assert.truthy(plan.stdout:find("is already paused; undo leaves it paused", 1, true), plan.stdout)
    assert.is_false(queue.status(r, a, { prefix = P }).paused)

    local res = rbe_cli { "run", book, "--state-dir", dir .. "/state", "--yes" }
    assert.are.equal(1, res.code, res.stdout .. res.stderr)
    assert.is_false(queue.status(r, a, { prefix = P }).paused)
    assert.is_true(queue.status(r, b, { prefix = P }).paused)
    -- the step's result names what it paused and what it found paused
    local journal = fs.read(fs.list(dir .. "/state/runs")[1] and
      (dir .. "/state/runs/" .. fs.list(dir .. "/state/runs")[1] .. "/journal.jsonl"))
    assert.truthy(journal:find('"already_paused":["' .. b .. '"]', 1, true), journal)
  end)

  it("a pause_step that fails half-way resumes what it paused before raising", function()
    local a, b = qname(), qname()
    for _, x in ipairs { a, b } do r:hset(key(x, "meta"), "version", "bullmq:6.7.0") end
    r:lpush(key(b, "active"), "7")                     -- a job that never finishes
    local logs = {}
    local c = { results = {}, step = "s", log = function(f, ...) logs[#logs + 1] = f:format(...) end }
    local err = raises(queue.pause_step { redis = URL, queues = { a, "missing" }, prefix = P,
      drain = false }.run, c)
    assert.are.equal("ENOQUEUE", err.code)
    assert.is_false(queue.status(r, a, { prefix = P }).paused)
    err = raises(queue.pause_step { redis = URL, queues = { a, b }, prefix = P,
      drain = "200ms" }.run, c)
    assert.are.equal("timeout", err.kind)
    assert.is_false(queue.status(r, a, { prefix = P }).paused)
    assert.is_false(queue.status(r, b, { prefix = P }).paused)
    assert.truthy(table.concat(logs, "\n"):find("step failed: resumed " .. b, 1, true))
  end)

  it("a second attempt (retry, rbe resume) still resumes what the first paused", function()
    local a = qname()
    r:hset(key(a, "meta"), "version", "bullmq:6.7.0")
    local spec = queue.pause_step { redis = URL, queues = a, prefix = P, drain = false }
    local c = { results = {}, step = "pause", run_dir = dir, log = function() end }
    spec.run(c)                                    -- the first attempt, then a crash
    c.results.pause = spec.run(c)                  -- the second finds it paused
    assert.are.same({ a }, c.results.pause.paused)
    assert.are.same({}, c.results.pause.already_paused)
    spec.undo(c)
    assert.is_false(queue.status(r, a, { prefix = P }).paused)
  end)

  it("resume_step resumes, and its undo pauses again", function()
    local a = qname()
    r:hset(key(a, "meta"), "version", "bullmq:6.7.0", "paused", 1)
    local spec = queue.resume_step { redis = URL, queues = a, prefix = P }
    local c = { results = {}, step = "s", log = function() end }
    assert.truthy(spec.plan(c)[1]:find("would resume paused", 1, true))
    c.results.s = spec.run(c)
    assert.are.same({ a }, c.results.s.resumed)
    assert.is_false(queue.status(r, a, { prefix = P }).paused)
    spec.undo(c)
    assert.is_true(queue.status(r, a, { prefix = P }).paused)
  end)
end)
