-- modules/cache.lua against real redis-servers: the fixture's shared
-- server (every key under a per-run prefix, removed at the end) for
-- counting, flushing, the max_keys guard, backups and restores, and a
-- private redis-server started by this file for FLUSHDB and the hit rate
-- (both touch the whole server).  The steps run in a real playbook.
local rbe = require "rbe"
local redis = require "rbe.redis"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local cache = require "cache"

local URL = rbe.env("RBE_TEST_REDIS_URL")
local P = ("rbec%d%d"):format(os.time() % 100000, math.random(1, 1e6))
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local ROOT = HERE .. "/../.."
local SERVERS = ROOT .. "/tests/fixtures/servers.sh"
local RBE = os.getenv("RBE_BIN") or (ROOT .. "/build/bin/rbe")

local function raises(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return err
end

-- r: a connection for the running test (closed after it: the helper
-- checks that no handle stays open between tests)
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

local n = 0
local function ns()
  n = n + 1
  return P .. ":" .. n .. ":"
end

-- keys k..i for i = 1..count, in pipelines of 500
local function fill(prefix, count, from)
  local i = from or 1
  local last = i + count - 1
  while i <= last do
    r:pipeline(function(p)
      for j = i, math.min(i + 499, last) do p:set(prefix .. j, "v" .. j) end
    end)
    i = i + 500
  end
end

local tmp, private_dir, private_url
setup(function()
  tmp = fs.tmpdir("rbe-cache-spec-")
  private_dir = fs.tmpdir("rbe-cache-redis-")
  proc.run({ SERVERS, "start", private_dir, "redis" }, { timeout = "30s" })
  private_url = fs.read(private_dir .. "/env"):match("RBE_TEST_REDIS_URL=(%S+)")
end)

teardown(function()
  local c <close> = redis.connect(URL)
  c:unlink_matching(P .. "*")
  if private_dir then proc.run({ SERVERS, "stop", private_dir }, { timeout = "30s" }) end
  if tmp then fs.remove(tmp, { recursive = true }) end
end)

---------------------------------------------------------------------------

describe("#redis cache.count", function()
  it("counts each key once, for the first pattern it matches", function()
    local k = ns()
    fill(k .. "user:", 50)
    fill(k .. "user:admin:", 3)
    fill(k .. "org:", 5)
    local total, per = cache.count(r, { k .. "user:*", k .. "user:admin:*", k .. "org:*" },
      { batch = 7 })
    assert.are.equal(58, total)
    assert.are.same({ [k .. "user:*"] = 53, [k .. "user:admin:*"] = 0, [k .. "org:*"] = 5 }, per)
    assert.are.equal(5, (cache.count(r, k .. "org:*")))
    assert.are.equal(0, (cache.count(r, k .. "nothing:*")))
  end)

  it("understands Redis's glob syntax when it removes overlaps", function()
    local g = cache._glob_to_lua
    assert.is_truthy(("abc"):find(g("a?c")))
    assert.is_truthy(("bx"):find(g("[abc]x")))
    assert.is_nil(("dx"):find(g("[abc]x")))
    assert.is_nil(("ax"):find(g("[^a]x")))
    assert.is_truthy(("kx"):find(g("[h-o]x")))
    assert.is_truthy(("a*b"):find(g("a\\*b")))
    assert.is_nil(("aXb"):find(g("a\\*b")))
    assert.is_truthy(("cache:user:1.2%"):find(g("cache:user:*")))
    assert.is_nil(("xcache:user:1"):find(g("cache:*")))
    local k = ns()
    fill(k .. "a", 3)                        -- a1 a2 a3
    fill(k .. "b", 3)
    assert.are.equal(6, (cache.count(r, { k .. "[ab]*", k .. "a?" })))
  end)
end)

describe("#redis cache.flush", function()
  it("unlinks every key of the patterns and leaves the others", function()
    local k = ns()
    fill(k .. "gemini:", 2500)
    fill(k .. "session:", 40)
    fill(k .. "keep:", 30)
    local deleted, info = cache.flush(r, { k .. "gemini:*", k .. "session:*" }, { batch = 300 })
    assert.are.equal(2540, deleted)
    assert.are.same({ [k .. "gemini:*"] = 2500, [k .. "session:*"] = 40 }, info.patterns)
    assert.is_true(info.seconds >= 0)
    assert.are.equal(0, (cache.count(r, { k .. "gemini:*", k .. "session:*" })))
    assert.are.equal(30, (cache.count(r, k .. "keep:*")))
    assert.are.equal(0, (cache.flush(r, k .. "gemini:*")))
  end)

  it("max_keys refuses before deleting anything when more keys match", function()
    local k = ns()
    fill(k .. "x:", 120)
    local err = raises(cache.flush, r, k .. "x:*", { max_keys = 100 })
    assert.are.equal("cache", err.kind)
    assert.are.equal("EMAXKEYS", err.code)
    assert.are.equal(120, err.matched)
    assert.truthy(err.message:find("120 keys match", 1, true), err.message)
    assert.truthy(err.message:find("nothing deleted", 1, true))
    assert.are.equal(120, (cache.count(r, k .. "x:*")))
    assert.are.equal(120, (cache.flush(r, k .. "x:*", { max_keys = 120 })))
  end)

  it("max_keys stops the flush when keys added meanwhile would pass it", function()
    local k = ns()
    fill(k .. "x:", 1000)
    cache._after_count = function() fill(k .. "x:", 600, 1001) end
    local ok, err = pcall(cache.flush, r, k .. "x:*", { max_keys = 1200, batch = 100 })
    cache._after_count = nil
    assert.is_false(ok)
    assert.are.equal("EMAXKEYS", err.code)
    assert.truthy(err.message:find("stopped after deleting", 1, true), err.message)
    assert.is_true(err.deleted <= 1200, "deleted " .. tostring(err.deleted))
    assert.are.equal(1600 - err.deleted, (cache.count(r, k .. "x:*")))
  end)

  it("refuses a pattern that matches every key unless max_keys is given", function()
    local err = raises(cache.flush, r, "*")
    assert.truthy(tostring(err):find("matches every key", 1, true))
    err = raises(cache.flush, r, { "ok:*", "**" })
    assert.truthy(tostring(err):find("'**'", 1, true))
    assert.truthy(tostring(raises(cache.flush, r, {})):find("a pattern or a list"))
    assert.truthy(tostring(raises(cache.flush, r, "a:*", { batc = 1 })):find("unknown option 'batc'"))
    assert.truthy(tostring(raises(cache.flush, nil, "a:*")):find("an rbe.redis client"))
  end)
end)

describe("#redis cache backups", function()
  it("saves every key with its expiry before deleting it; restore brings them back", function()
    local k = ns()
    r:set(k .. "s", "plain")
    r:set(k .. "bin", "a\0b\nc\r\n\255", "PX", 600000)
    r:hset(k .. "h", "f1", "v1", "f2", "v2")
    r:rpush(k .. "l", "x", "y", "z")
    r:zadd(k .. "z", 1, "one", 2, "two")
    r:sadd(k .. "set", "m")
    fill(k .. "many:", 700)
    local path = tmp .. "/b1.backup"
    local deleted, info = cache.flush(r, k .. "*", { backup = path, batch = 100 })
    assert.are.equal(706, deleted)
    assert.are.equal(706, info.backup.keys)
    assert.are.equal(path, info.backup.path)
    assert.are.equal(fs.stat(path).size, info.backup.bytes)
    assert.are.equal(tonumber("600", 8), fs.stat(path).mode)
    assert.are.equal(0, (cache.count(r, k .. "*")))

    local res = cache.restore(r, path)
    assert.are.same({ restored = 706, existing = 0, expired = 0, path = path }, res)
    assert.are.equal("plain", r:get(k .. "s"))
    assert.are.equal(-1, r:pttl(k .. "s"))
    assert.are.equal("a\0b\nc\r\n\255", r:get(k .. "bin"))
    local ttl = r:pttl(k .. "bin")
    assert.is_true(ttl > 590000 and ttl <= 600000, "pttl " .. ttl)
    assert.are.same({ "f1", "v1", "f2", "v2" }, r:hgetall(k .. "h"))
    assert.are.same({ "x", "y", "z" }, r:lrange(k .. "l", 0, -1))
    assert.are.same({ "one", "1", "two", "2" }, r:zrange(k .. "z", 0, -1, "WITHSCORES"))
    assert.are.equal("v699", r:get(k .. "many:699"))
  end)

  it("restore leaves keys that exist again (unless replace) and skips expired ones", function()
    local k = ns()
    r:set(k .. "a", "old-a")
    r:set(k .. "b", "old-b")
    r:set(k .. "short", "x", "PX", 150)
    local path = tmp .. "/b2.backup"
    assert.are.equal(3, (cache.flush(r, k .. "*", { backup = path })))
    r:set(k .. "a", "new-a")                  -- the app filled it again
    rbe.sleep(0.2)                            -- k.."short" would have expired
    local res = cache.restore(r, path)
    assert.are.same({ 1, 1, 1 }, { res.restored, res.existing, res.expired })
    assert.are.equal("new-a", r:get(k .. "a"))
    assert.are.equal("old-b", r:get(k .. "b"))
    assert.are.equal(0, r:exists(k .. "short"))
    res = cache.restore(r, path, { replace = true })
    assert.are.equal(2, res.restored)
    assert.are.equal("old-a", r:get(k .. "a"))
  end)

  it("backup_max_bytes stops the flush; what was deleted is in the file", function()
    local k = ns()
    fill(k .. "x:", 500)
    local path = tmp .. "/b3.backup"
    local err = raises(cache.flush, r, k .. "x:*", { backup = path, batch = 50,
      backup_max_bytes = 4000 })
    assert.are.equal("EFBIG", err.code)
    assert.is_true(err.deleted > 0 and err.deleted < 500)
    assert.truthy(err.message:find(path, 1, true))
    assert.are.equal(500 - err.deleted, (cache.count(r, k .. "x:*")))
    local res = cache.restore(r, path)
    assert.are.equal(err.deleted, res.restored)
    assert.are.equal(500, (cache.count(r, k .. "x:*")))
  end)

  it("a damaged or foreign file is refused", function()
    local path = tmp .. "/b4.backup"
    fs.write(path, "hello")
    assert.are.equal("EBADMSG", raises(cache.restore, r, path).code)
    fs.write(path, cache.BACKUP_MAGIC .. "5:10:-1\nabc")
    local err = raises(cache.restore, r, path)
    assert.are.equal("EBADMSG", err.code)
    assert.truthy(err.message:find("truncated", 1, true))
    assert.are.equal("ENOENT", raises(cache.restore, r, tmp .. "/none").code)
  end)
end)

describe("#redis cache on a private server", function()
  it("flushdb needs the explicit confirmation, then empties the database", function()
    local p <close> = redis.connect(private_url)
    p:set("a", 1)
    p:set("b", 2)
    local err = raises(cache.flushdb, p)
    assert.truthy(tostring(err):find('confirm = "FLUSHDB"', 1, true))
    err = raises(cache.flushdb, p, { confirm = true })
    assert.truthy(tostring(err):find("pass", 1, true))
    assert.are.equal(2, p:dbsize())
    assert.are.equal(2, cache.flushdb(p, { confirm = "FLUSHDB", async = false }))
    assert.are.equal(0, p:dbsize())
  end)

  it("hit_rate: since the last reset, or over a window", function()
    local p <close> = redis.connect(private_url)
    p:config("RESETSTAT")
    assert.is_nil((cache.hit_rate(p)))
    p:set("k", "v")
    for _ = 1, 3 do p:get("k") end
    p:get("missing")
    local rate, c = cache.hit_rate(p)
    assert.are.equal(0.75, rate)
    assert.are.same({ hits = 3, misses = 1 }, c)
    local t = rbe.spawn(function()
      rbe.sleep(0.05)
      p:get("missing")
      p:get("k")
    end)
    rate, c = cache.hit_rate(p, { window = "200ms" })
    t:join()
    assert.are.equal(0.5, rate)
    assert.are.same({ hits = 1, misses = 1 }, c)
  end)
end)

---------------------------------------------------------------------------

describe("#redis cache steps in playbooks", function()
  local function rbe_cli(args, env)
    local argv = { RBE }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    return proc.run(argv, { check = false, timeout = "60s", env = env })
  end

  it("plan counts; a failure later restores the flushed keys from the run dir", function()
    local k = ns()
    fill(k .. "gemini:", 300)
    fill(k .. "session:", 20)
    r:hset(k .. "flags", "dark", "1")
    local book = tmp .. "/cache-book.lua"
    fs.write(book, [[
local rbe = require "rbe"
local pb = require "rbe.playbook"
local cache = require "cache"
local K = rbe.env "CSPEC_PREFIX"
return pb.playbook "cache spec" {
  pb.step "flush caches" (cache.flush_step { redis = rbe.env "CSPEC_REDIS",
    patterns = { K .. "gemini:*", K .. "session:*", K .. "flags" }, max_keys = 1000,
    backup = true }),
  pb.step "flush nobackup" (cache.flush_step { redis = rbe.env "CSPEC_REDIS",
    patterns = K .. "nothing:*" }),
  pb.step "break" { run = function() error("later step failed") end },
}
]])
    local env = { CSPEC_REDIS = URL, CSPEC_PREFIX = k }
    local plan = rbe_cli({ "plan", book }, env)
    assert.are.equal(0, plan.code, plan.stderr)
    assert.truthy(plan.stdout:find(("would UNLINK 321 keys (300 %sgemini:*, 20 %ssession:*, 1 %sflags)")
      :format(k, k, k), 1, true), plan.stdout)
    assert.truthy(plan.stdout:find("undo restores them", 1, true))
    assert.truthy(plan.stdout:find("undo cannot bring the keys back", 1, true))
    assert.are.equal(321, (cache.count(r, k .. "*")))

    local state = tmp .. "/state"
    local res = rbe_cli({ "run", book, "--state-dir", state, "--yes" }, env)
    assert.are.equal(1, res.code, res.stdout .. res.stderr)
    assert.are.equal(321, (cache.count(r, k .. "*")))
    assert.are.equal("1", r:hget(k .. "flags", "dark"))
    local run = fs.list(state .. "/runs")[1]
    assert.is_true(fs.exists(state .. "/runs/" .. run .. "/cache-flush-caches.backup"))
  end)

  it("a flush_step that fails half-way puts the keys it deleted back", function()
    local k = ns()
    fill(k .. "x:", 300)
    local spec = cache.flush_step { redis = URL, patterns = k .. "x:*", backup = true,
      batch = 50, backup_max_bytes = 3000 }
    local ctx = { results = {}, step = "flush", run_dir = tmp, log = function() end }
    local err = raises(spec.run, ctx)
    assert.are.equal("EFBIG", err.code)
    assert.is_true(err.deleted > 0)
    assert.are.equal(300, (cache.count(r, k .. "x:*")))
  end)

  it("a second attempt keeps the first attempt's backup; undo restores both", function()
    local k = ns()
    fill(k .. "a:", 30)
    local run_dir = fs.tmpdir(tmp .. "/run-")
    local ctx = { results = {}, step = "flush twice", run_dir = run_dir, log = function() end }
    local spec = cache.flush_step { redis = URL, patterns = k .. "*", backup = true }
    spec.run(ctx)                                  -- the first attempt, then a crash
    fill(k .. "b:", 20)                            -- the app wrote more meanwhile
    ctx.results[ctx.step] = spec.run(ctx)
    assert.are.equal(20, ctx.results[ctx.step].deleted)
    assert.are.same({ "cache-flush-twice.2.backup", "cache-flush-twice.backup" }, fs.list(run_dir))
    spec.undo(ctx)
    assert.are.equal(50, (cache.count(r, k .. "*")))
  end)

  it("plan says REFUSE over max_keys", function()
    local k = ns()
    fill(k .. "x:", 20)
    local spec = cache.flush_step { redis = URL, patterns = k .. "x:*", max_keys = 10 }
    local out = spec.plan { results = {}, step = "s", log = function() end }
    assert.truthy(out[1]:find("would REFUSE: 20 keys match", 1, true), out[1])
    assert.is_nil(spec.undo)
  end)
end)
