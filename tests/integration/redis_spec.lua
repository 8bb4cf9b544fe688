-- rbe.redis against real redis-servers: the shared fixture server
-- (RBE_TEST_REDIS_URL) for everything that leaves it healthy, and a private
-- redis-server started by this file for the destructive cases (stalls,
-- kill and restart, SCRIPT FLUSH, CLIENT KILL).  Every key this file
-- writes on the shared server starts with a per-run prefix, removed at the
-- end; the ACL user it creates is deleted.
local rbe = require "rbe"
local redis = require "rbe.redis"
local proc = require "rbe.proc"
local fs = require "rbe.fs"

local URL = rbe.env("RBE_TEST_REDIS_URL")
local PREFIX = ("rbe:spec:%d:%d:"):format(os.time(), math.random(1, 1e9))
local PASSWORD = "s3cr3t-PW-" .. math.random(1e6, 9e6)

local function raises(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return err
end

local function key(s) return PREFIX .. s end

local function no_secret(s)
  s = tostring(s)
  assert.is_nil(s:find(PASSWORD, 1, true), "password leaked into: " .. s)
end

---------------------------------------------------------------------------
-- a private redis-server (destructive specs)

local private = {}

local function port_free(port)
  local ok, err = rbe.try(redis.connect, "redis://127.0.0.1:" .. port,
    { connect_timeout = 1 })
  if ok then err:close() return false end
  return err.code == "ECONNREFUSED"
end

-- Start redis-server on private.port (a new one when nil); wait until it
-- answers and is really ours.
local function start_private()
  for _ = 1, 10 do
    local port = private.port
    if not port then
      port = math.random(20000, 31999)
      if not port_free(port) then goto next end
    end
    do
      local child = proc.spawn({ "redis-server", "--port", tostring(port),
        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--enable-debug-command", "yes", "--dir", private.dir,
        "--unixsocket", private.dir .. "/redis.sock", "--unixsocketperm", "700" },
        { stdout = "null", stderr = "null", kill_grace = "2s" })
      local deadline = rbe.now() + 10
      while rbe.now() < deadline and child:running() do
        local ok, r = rbe.try(redis.connect, "redis://127.0.0.1:" .. port,
          { connect_timeout = 0.5 })
        if ok then
          local pid = r:info("server").process_id
          r:close()
          if pid == child.pid then
            private.port, private.child = port, child
            private.url = "redis://127.0.0.1:" .. port
            return
          end
          break
        end
        rbe.sleep(0.02)
      end
      child:close()
      rbe.try(child.wait, child)
    end
    ::next::
  end
  error("could not start a private redis-server")
end

local function stop_private()
  local child = private.child
  private.child = nil
  if child then
    child:close()
    rbe.try(child.wait, child)
  end
end

---------------------------------------------------------------------------

describe("#redis rbe.redis", function()
  teardown(function()
    local r <close> = redis.connect(URL)
    r:unlink_matching(PREFIX .. "*")
  end)

  describe("replies", function()
    it("maps every reply type", function()
      local r <close> = redis.connect(URL)
      -- status
      assert.are.equal("OK", r:set(key("s"), "v"))
      assert.are.equal("PONG", r:ping())
      assert.are.equal("string", r:type(key("s")))
      -- integers, incl. negative and 64-bit
      assert.are.equal(1, r:incr(key("i")))
      assert.are.equal(-41, r:decrby(key("i"), 42))
      assert.are.equal(math.tointeger(2^62), r:incrby(key("big"), math.tointeger(2^62)))
      assert.are.equal("integer", math.type(r:exists(key("s"))))
      -- bulk, binary-safe
      local bin = "a\0b\r\n\0\255" .. string.rep("\0", 10)
      r:set(key("bin\0key"), bin)
      assert.are.equal(bin, r:get(key("bin\0key")))
      local big = {}
      for i = 1, 1024 * 1024 do big[i] = string.char((i * 7) % 256) end
      big = table.concat(big)
      r:set(key("big1m"), big)
      assert.are.equal(big, r:get(key("big1m")))
      assert.are.equal("", (r:set(key("empty"), "") and r:get(key("empty"))))
      -- nil
      assert.are.equal(rbe.null, r:get(key("missing")))
      assert.are.equal(rbe.null, r:hget(key("missing"), "f"))
      -- arrays, with nil slots kept in place
      r:del(key("l"))
      r:rpush(key("l"), "a", "b", "c")
      assert.are.same({ "a", "b", "c" }, r:lrange(key("l"), 0, -1))
      assert.are.same({}, r:lrange(key("missing"), 0, -1))
      local mg = r:mget(key("s"), key("missing"), key("empty"))
      assert.are.equal(3, #mg)
      assert.are.same({ "v", rbe.null, "" }, mg)
      -- nested arrays, and error and status replies inside an array
      local nested = r:eval([[return {1, {2, {3, 'x'}, {}}, redis.error_reply('MYERR boom'),
        redis.status_reply('FINE')}]], {}, {})
      assert.are.equal(1, nested[1])
      assert.are.same({ 2, { 3, "x" }, {} }, nested[2])
      assert.is_true(rbe.is_error(nested[3]))
      assert.are.equal("MYERR", nested[3].code)
      assert.are.equal("FINE", nested[4])
    end)

    it("sends numbers, binary strings and secrets as arguments", function()
      local r <close> = redis.connect(URL)
      r:set(key("n"), 1.5)
      assert.are.equal("1.5", r:get(key("n")))
      r:set(key("n"), 0.1)
      assert.are.equal("0.1", r:get(key("n")))
      r:set(key("n"), 42)
      assert.are.equal("42", r:get(key("n")))
      assert.are.equal(2, r:zadd(key("z"), 1.25, "a", math.huge, "b"))
      assert.are.equal("inf", r:zscore(key("z"), "b"))
      r:set(key("sec"), rbe.secret("hidden"))
      assert.are.equal("hidden", r:get(key("sec")))
      -- bad arguments are usage errors naming the argument; nothing is sent
      local e = raises(r.set, r, key("x"), nil)
      assert.truthy(tostring(e):find("argument #3: nil", 1, true))
      e = raises(r.set, r, key("x"), { 1 })
      assert.truthy(tostring(e):find("table argument", 1, true))
      e = raises(r.set, r, key("x"), true)
      assert.truthy(tostring(e):find("boolean", 1, true))
      assert.are.equal(0, r:exists(key("x")))
    end)

    it("raises error replies as `redis` errors with the prefix as code", function()
      local r <close> = redis.connect(URL)
      r:set(key("str"), "x")
      local e = raises(r.hget, r, key("str"), "f")
      assert.are.equal("redis", e.kind)
      assert.are.equal("WRONGTYPE", e.code)
      assert.are.equal("HGET", e.command)
      assert.is_false(e.retryable)
      assert.truthy(tostring(e):find("WRONGTYPE Operation against a key", 1, true))
      e = raises(r.call, r, "NOSUCHCOMMAND", "x")
      assert.are.equal("ERR", e.code)
      e = raises(r.evalsha, r, string.rep("0", 40), 0)
      assert.are.equal("NOSCRIPT", e.code)
      e = raises(r.incr, r, key("str"))
      assert.are.equal("ERR", e.code)
      -- the connection is still fine after error replies
      assert.are.equal("x", r:get(key("str")))
    end)

    it("has method sugar for any command, and call{} with options", function()
      local r <close> = redis.connect(URL)
      assert.are.equal(2, r:hset(key("h"), "a", "1", "b", "2"))
      assert.are.same({ "1", "2" }, r:hmget(key("h"), "a", "b"))
      assert.are.equal(1, r:unlink(key("h")))
      assert.are.equal("OK", r:call("set", key("c"), "v"))
      assert.are.equal("v", r:call { "GET", key("c"), timeout = "2s" })
      assert.are.equal("embstr", r:object("encoding", key("c")))
      assert.truthy(r:client("ID") > 0)
      local e = raises(r.call, r, { "GET", key("c"), tiemout = 1 })
      assert.truthy(tostring(e):find("unknown option 'tiemout'", 1, true))
      -- commands that would break the reply order are refused
      e = raises(r.call, r, "SUBSCRIBE", "x")
      assert.truthy(tostring(e):find("r:subscribe", 1, true))
      e = raises(r.monitor, r)
      assert.truthy(tostring(e):find("MONITOR", 1, true))
      e = raises(r.hello, r, 3)
      assert.truthy(tostring(e):find("RESP2", 1, true))
      assert.are.equal("table", type(r:hello(2)))
      assert.are.equal("PONG", r:ping())
    end)

    it("parses INFO into a table", function()
      local r <close> = redis.connect(URL)
      r:set(key("info"), "1")
      local all = r:info()
      assert.are.equal("string", type(all.redis_version))
      assert.truthy(all.redis_version:match("^%d+%.%d+%.%d+$"))
      assert.are.equal("integer", math.type(all.connected_clients))
      assert.are.equal(tonumber(rbe.env("RBE_TEST_REDIS_PORT")), all.tcp_port)
      assert.are.equal("table", type(all.db0))
      assert.truthy(all.db0.keys >= 1)
      local stats = r:info("stats")
      assert.are.equal("integer", math.type(stats.keyspace_hits))
      assert.is_nil(stats.redis_version)
      local cs = r:info("commandstats")
      assert.truthy(cs.cmdstat_set.calls >= 1)
      assert.are.equal("number", type(cs.cmdstat_set.usec_per_call))
      local t = redis._parse_info("# S\r\na:1\r\nb:x,y\r\nc:k=v,n=2.5\r\nd:\r\n")
      assert.are.same({ a = 1, b = "x,y", c = { k = "v", n = 2.5 }, d = "" }, t)
    end)
  end)

  describe("pipelines", function()
    it("sends 10,000 commands in one go and returns replies in order", function()
      local r <close> = redis.connect(URL)
      local replies = r:pipeline(function(p)
        for i = 1, 5000 do p:set(key("p:" .. i), i) end
        for i = 1, 5000 do p:get(key("p:" .. i)) end
      end)
      assert.are.equal(10000, replies.n)
      for i = 1, 5000 do
        assert.are.equal("OK", replies[i])
        assert.are.equal(tostring(i), replies[5000 + i])
      end
    end)

    it("returns an error reply in its slot instead of raising", function()
      local r <close> = redis.connect(URL)
      local replies = r:pipeline(function(p)
        p:set(key("pe"), "text")
        local slot = p:incr(key("pe"))
        assert.are.equal(2, slot)
        p:call("GET", key("pe"))
        p:get(key("missing"))
      end)
      assert.are.equal(4, replies.n)
      assert.are.equal("OK", replies[1])
      assert.is_true(rbe.is_error(replies[2]))
      assert.are.equal("ERR", replies[2].code)
      assert.are.equal("INCR", replies[2].command)
      assert.are.equal(2, replies[2].index)
      assert.are.equal("text", replies[3])
      assert.are.equal(rbe.null, replies[4])
      assert.are.same({ n = 0 }, r:pipeline(function() end))
      -- a bad argument raises where it is recorded; nothing is sent
      local line
      local e = raises(r.pipeline, r, function(p)
        p:set(key("never"), 1)
        line = debug.getinfo(1, "l").currentline + 1
        p:set(key("never2"), {})
      end)
      assert.truthy(tostring(e):find("SET: argument #3: table argument", 1, true))
      assert.truthy(tostring(e):find(":" .. line .. ":", 1, true))
      assert.are.equal(0, r:exists(key("never")))
      e = raises(r.pipeline, r, function(p) p:subscribe("x") end)
      assert.truthy(tostring(e):find("r:subscribe", 1, true))
      local kept
      r:pipeline(function(p) kept = p end)
      e = raises(kept.get, kept, "x")
      assert.truthy(tostring(e):find("already sent", 1, true))
    end)

    it("runs transactions", function()
      local r <close> = redis.connect(URL)
      r:set(key("tx"), 1)
      local res = r:transaction(function(t)
        t:incr(key("tx"))
        t:incrby(key("tx"), 10)
      end)
      assert.are.same({ 2, 12 }, res)
      local e = raises(r.transaction, r, function(t)
        t:incr(key("tx"))
        t:call("NOSUCHCOMMAND")
      end)
      assert.are.equal("EXECABORT", e.code)
      assert.are.equal("12", r:get(key("tx")))
    end)
  end)

  describe("scan", function()
    it("returns each of 100,000 keys exactly once, also while keys change", function()
      local r <close> = redis.connect(URL)
      local N = 100000
      for b = 0, 9 do
        r:pipeline(function(p)
          local args = {}
          for i = b * 10000 + 1, (b + 1) * 10000 do
            args[#args + 1] = key("scan:" .. i)
            args[#args + 1] = "x"
            if #args == 2000 then p:mset(table.unpack(args)); args = {} end
          end
        end)
      end
      local seen, n = {}, 0
      for k in r:scan { match = key("scan:*"), count = 1000 } do
        assert.is_nil(seen[k], "returned twice: " .. k)
        seen[k] = true
        n = n + 1
      end
      assert.are.equal(N, n)
      -- keys added during the iteration (the table grows and rehashes):
      -- the original ones still come exactly once, none comes twice
      seen, n = {}, 0
      local added = 0
      for k in r:scan { match = key("scan:*"), count = 500 } do
        assert.is_nil(seen[k], "returned twice: " .. k)
        seen[k] = true
        if tonumber(k:match("(%d+)$")) <= N then n = n + 1 end
        if added < 60000 and n % 5000 == 0 then
          r:pipeline(function(p)
            local args = {}
            for i = 1, 2000 do
              args[#args + 1] = key("scan:" .. (N + added + i))
              args[#args + 1] = "y"
            end
            p:mset(table.unpack(args))
          end)
          added = added + 2000
        end
      end
      assert.are.equal(N, n)
      assert.truthy(added > 0)
      -- batches
      local total = 0
      for keys in r:scan { match = key("scan:*"), count = 5000, batch = true } do
        assert.truthy(#keys > 0)
        total = total + #keys
      end
      assert.are.equal(N + added, total)
      assert.are.equal(N + added, r:unlink_matching(key("scan:*"), { count = 2000 }))
      assert.is_nil(r:scan { match = key("scan:*") }())
    end)

    it("unlink_matching deletes by pattern and can be cancelled midway", function()
      local r <close> = redis.connect(URL)
      local args = {}
      for i = 1, 20000 do
        args[#args + 1] = key("um:" .. i)
        args[#args + 1] = "v"
      end
      r:pipeline(function(p)
        for i = 1, #args, 2000 do p:mset(table.unpack(args, i, i + 1999)) end
      end)
      r:set(key("keep"), "1")
      -- cancelled: its helper tasks are cancelled too (the spec's leak check)
      local e = raises(rbe.timeout, 0.002, r.unlink_matching, r, key("um:*"), { count = 10 })
      assert.are.equal("timeout", e.kind)
      local left = 0
      for _ in r:scan { match = key("um:*"), count = 1000 } do left = left + 1 end
      assert.truthy(left > 0)
      assert.are.equal(left, r:unlink_matching(key("um:*"), { count = 100 }))
      assert.are.equal(0, r:unlink_matching(key("um:*")))
      assert.are.equal("1", r:get(key("keep")))
      e = raises(r.unlink_matching, r, key("um:*"), { cout = 1 })
      assert.truthy(tostring(e):find("unknown option 'cout'", 1, true))
    end)

    it("iterates hashes, sets and sorted sets", function()
      local r <close> = redis.connect(URL)
      local args = {}
      for i = 1, 300 do args[#args + 1] = "f" .. i; args[#args + 1] = "v" .. i end
      r:hset(key("hs"), table.unpack(args))
      local got = 0
      for f, v in r:hscan(key("hs"), { count = 50 }) do
        assert.are.equal("v" .. f:sub(2), v)
        got = got + 1
      end
      assert.are.equal(300, got)
      r:sadd(key("ss"), "a", "b", "c")
      local set = {}
      for m in r:sscan(key("ss")) do set[#set + 1] = m end
      table.sort(set)
      assert.are.same({ "a", "b", "c" }, set)
      r:zadd(key("zs"), 1, "one", 2.5, "two")
      local z = {}
      for m, score in r:zscan(key("zs"), { match = "t*" }) do z[m] = score end
      assert.are.same({ two = 2.5 }, z)
      local e = raises(r.sscan, r, key("ss"), { type = "set" })
      assert.truthy(tostring(e):find("unknown option 'type'", 1, true))
    end)
  end)

  describe("concurrency and cancellation", function()
    it("serves 1,000 concurrent tasks on one connection", function()
      local r <close> = redis.connect(URL)
      local id = r:client("ID")
      local fns = {}
      for i = 1, 1000 do
        fns[i] = function()
          r:set(key("t:" .. i), "v" .. i)
          return { r:incr(key("counter")), r:get(key("t:" .. i)) }
        end
      end
      local res = rbe.parallel(fns)
      local incrs = {}
      for i = 1, 1000 do
        assert.are.equal("v" .. i, res[i][2])
        incrs[res[i][1]] = true
      end
      for i = 1, 1000 do assert.is_true(incrs[i]) end
      assert.are.equal("1000", r:get(key("counter")))
      assert.are.equal(id, r:client("ID"))
    end)

    it("drops the replies of cancelled tasks; the others get theirs", function()
      local r <close> = redis.connect(URL)
      r:pipeline(function(p)
        for i = 1, 200 do p:set(key("c:" .. i), "v" .. i) end
      end)
      local tasks = {}
      for i = 1, 200 do
        tasks[i] = rbe.spawn(function()
          if i % 3 == 0 then
            return r:pipeline(function(p) p:get(key("c:" .. i)) end)[1]
          end
          return r:get(key("c:" .. i))
        end)
      end
      rbe.sleep(0)                        -- they run and send
      for i = 2, 200, 2 do tasks[i]:cancel() end
      for i = 1, 200 do
        local ok, v = rbe.try(tasks[i].join, tasks[i])
        if i % 2 == 0 then
          assert.is_false(ok)
          assert.are.equal("cancelled", v.kind)
        else
          assert.is_true(ok)
          assert.are.equal("v" .. i, v)
        end
      end
      assert.are.equal("v7", r:get(key("c:7")))
      -- an outer rbe.timeout cancels the wait; the connection stays usable
      local e = raises(rbe.timeout, 0.05, r.call, r, "EVAL",
        "local t = redis.call('TIME') local s = t[1] * 1e6 + t[2] "
        .. "while (function() local u = redis.call('TIME') return u[1] * 1e6 + u[2] end)() < s + 200000 do end "
        .. "return 1", 0)
      assert.are.equal("timeout", e.kind)
      assert.are.equal("PONG", r:ping())
    end)

    it("closing fails pending commands with `closed`; no reconnect after close", function()
      local r = redis.connect(URL)
      local t = rbe.spawn(function() return r:blpop(key("never"), 5) end)
      rbe.sleep(0.05)
      r:close()
      local ok, e = rbe.try(t.join, t)
      assert.is_false(ok)
      assert.are.equal("closed", e.kind)
      e = raises(r.ping, r)
      assert.are.equal("closed", e.kind)
      assert.are.equal("CLOSED", e.code)
      r:close()                           -- twice is fine
      assert.truthy(tostring(r):find("closed", 1, true))
    end)

    it("closes connections that are garbage-collected", function()
      local before = redis._stats().conns
      do
        local r = redis.connect(URL)
        r:set(key("gc"), 1)
      end
      collectgarbage()
      collectgarbage()
      local deadline = rbe.now() + 5
      while redis._stats().conns > before and rbe.now() < deadline do
        rbe.sleep(0.01)
        collectgarbage()
      end
      assert.are.equal(before, redis._stats().conns)
      assert.are.equal(0, redis._stats().reqs)
    end)

    it("extends the timeout of blocking commands by their block time", function()
      local r <close> = redis.connect(URL, { timeout = "100ms" })
      local t0 = rbe.now()
      assert.are.equal(rbe.null, r:blpop(key("empty-list"), 0.3))
      assert.truthy(rbe.now() - t0 >= 0.25)
      -- an explicit timeout shorter than the block wins
      local e = raises(r.call, r, { "BLPOP", key("empty-list"), "1", timeout = "100ms" })
      assert.are.equal("timeout", e.kind)
      -- a cancelled blocking command closes the connection (it would hold
      -- every later command); the next call reconnects
      local task = rbe.spawn(function() return r:brpop(key("empty-list"), 0) end)
      rbe.sleep(0.05)
      task:cancel()
      assert.is_false((rbe.try(task.join, task)))
      assert.are.equal("PONG", r:ping())
    end)
  end)

  describe("pub/sub", function()
    it("delivers messages and pattern messages on a dedicated connection", function()
      local r <close> = redis.connect(URL)
      local ch = key("ch")
      local sub <close> = r:subscribe(ch .. "1", ch .. "2")
      assert.are.equal(1, r:publish(ch .. "1", "hello\0world"))
      local m = sub:next("2s")
      assert.are.same({ kind = "message", channel = ch .. "1", payload = "hello\0world" }, m)
      assert.is_nil(sub:next("50ms"))
      sub:psubscribe(ch .. "p*")
      r:publish(ch .. "pq", "x")
      r:publish(ch .. "2", "y")
      m = sub:next("2s")
      assert.are.same({ kind = "pmessage", pattern = ch .. "p*", channel = ch .. "pq", payload = "x" }, m)
      assert.are.equal("y", sub:next("2s").payload)
      sub:unsubscribe(ch .. "1")
      assert.are.equal(0, r:publish(ch .. "1", "gone"))
      assert.are.equal(1, r:publish(ch .. "2", "still"))
      assert.are.equal("still", sub:next("2s").payload)
      sub:unsubscribe()
      sub:punsubscribe()
      assert.are.equal(0, r:publish(ch .. "2", "gone"))
      -- the main connection was never in subscribe mode
      assert.are.equal("PONG", r:ping())
    end)

    it("is a for-loop iterator that closes itself; a cancelled wait loses nothing", function()
      local r <close> = redis.connect(URL)
      local ch = key("loop")
      local sub <close> = r:subscribe(ch)
      local waiter = rbe.spawn(function() return sub:next() end)
      rbe.sleep(0.02)
      waiter:cancel()
      assert.is_false((rbe.try(waiter.join, waiter)))
      r:publish(ch, "first")
      assert.are.equal("first", sub:next("2s").payload)
      local function subscribers()
        return r:pubsub("NUMSUB", ch .. "x")[2]
      end
      local got = {}
      local pub = rbe.spawn(function()
        while subscribers() == 0 do rbe.sleep(0.005) end
        for i = 1, 3 do r:publish(ch .. "x", "m" .. i) end
      end)
      for msg in r:subscribe(ch .. "x") do
        got[#got + 1] = msg.payload
        if #got == 3 then break end
      end
      pub:join()
      assert.are.same({ "m1", "m2", "m3" }, got)
      -- leaving the loop closed the subscription's connection
      local deadline = rbe.now() + 5
      while subscribers() > 0 and rbe.now() < deadline do rbe.sleep(0.01) end
      assert.are.equal(0, subscribers())
    end)
  end)

  describe("authentication", function()
    local user = ("rbe_spec_%d"):format(math.random(1, 1e9))
    local port = rbe.env("RBE_TEST_REDIS_PORT")

    setup(function()
      local r <close> = redis.connect(URL)
      r:acl("SETUSER", user, "on", ">" .. PASSWORD, "~" .. PREFIX .. "*", "&*", "+@all")
    end)
    teardown(function()
      local r <close> = redis.connect(URL)
      r:acl("DELUSER", user)
    end)

    it("logs in as an ACL user with a password", function()
      local url = ("redis://%s:%s@127.0.0.1:%s/0"):format(user, PASSWORD, port)
      local r <close> = redis.connect(url)
      assert.are.equal(user, r:acl("WHOAMI"))
      r:set(key("acl"), "ok")
      local e = raises(r.get, r, "not-my-prefix")
      assert.are.equal("NOPERM", e.code)
      no_secret(r)
      no_secret(e)
      -- options instead of a URL; the password may be an rbe.secret
      local r2 <close> = redis.connect { host = "127.0.0.1", port = tonumber(port),
        user = user, password = rbe.secret(PASSWORD), db = 0 }
      assert.are.equal("ok", r2:get(key("acl")))
    end)

    it("fails with WRONGPASS on a wrong password, never showing it", function()
      local url = ("redis://%s:%s-wrong@127.0.0.1:%s/0"):format(user, PASSWORD, port)
      local e = raises(redis.connect, url)
      assert.are.equal("redis", e.kind)
      assert.are.equal("WRONGPASS", e.code)
      assert.is_false(e.retryable)
      assert.truthy(tostring(e):find(user .. ":***@", 1, true))
      no_secret(e)
      no_secret(e.message)
      -- AUTH on a server without passwords for `default` fails too
      e = raises(redis.connect, URL, { password = PASSWORD })
      assert.are.equal("redis", e.kind)
      no_secret(e)
      -- refused connections and timeouts do not show it either
      e = raises(redis.connect, ("redis://:%s@127.0.0.1:1/0"):format(PASSWORD))
      assert.are.equal("ECONNREFUSED", e.code)
      assert.is_true(e.retryable)
      no_secret(e)
    end)

    it("refuses rediss:// (no TLS in hiredis 0.14) and never falls back", function()
      local e = raises(redis.connect, ("rediss://:%s@127.0.0.1:%s/0"):format(PASSWORD, port))
      assert.are.equal("redis", e.kind)
      assert.are.equal("ENOTSUP", e.code)
      assert.truthy(e.message:find("TLS", 1, true))
      no_secret(e)
    end)

    it("parses URLs", function()
      local c = redis._parse_url("redis://u%40x:p%3Aw@[::1]:7000/3")
      assert.are.same({ "u@x", "p:w", "::1", 7000, 3 },
        { c.user, rbe.reveal(c.password), c.host, c.port, c.db })
      c = redis._parse_url("redis://localhost")
      assert.are.same({ "localhost", 6379, 0 }, { c.host, c.port, c.db })
      c = redis._parse_url("unix:///run/redis.sock?db=2")
      assert.are.same({ "/run/redis.sock", 2 }, { c.path, c.db })
      local cfg = redis._build_cfg("redis://:pw@h:1/2", { timeout = "250ms", reconnect = false }, "t")
      assert.are.equal("redis://:***@h:1/2", cfg.desc)
      assert.are.equal(0.25, cfg.timeout)
      assert.is_false(cfg.reconnect)
      assert.is_true(rbe.is_secret(cfg.password))
      local e = raises(redis._build_cfg, "redis://h", { timout = 1 }, "t")
      assert.truthy(tostring(e):find("unknown option 'timout'", 1, true))
      e = raises(redis._parse_url, "redis://justapassword@h")
      assert.truthy(tostring(e):find("after a colon", 1, true))
      e = raises(redis._parse_url, "http://h")
      assert.truthy(tostring(e):find("unsupported URL scheme", 1, true))
    end)
  end)

  describe("failures (private server)", function()
    setup(function()
      private.dir = fs.tmpdir("rbe-redis-spec")
      private.port = nil
      start_private()
    end)
    teardown(function()
      stop_private()
      fs.remove(private.dir, { recursive = true, missing_ok = true })
    end)

    it("uses EVALSHA and falls back to EVAL on NOSCRIPT", function()
      local r <close> = redis.connect(private.url)
      local script = "return {KEYS[1], ARGV[1], ARGV[2], #KEYS}"
      assert.are.equal(redis._sha1hex(script), r:script("LOAD", script))
      r:script("FLUSH")
      r:config("RESETSTAT")
      assert.are.same({ "k", "a", "b", 1 }, r:eval(script, { "k" }, { "a", "b" }))
      local cs = r:info("commandstats")
      assert.are.equal(1, cs.cmdstat_evalsha.calls)
      assert.are.equal(1, cs.cmdstat_evalsha.failed_calls)
      assert.are.equal(1, cs.cmdstat_eval.calls)
      -- cached now: EVALSHA only
      assert.are.same({ "k2", "c", "d", 1 }, r:eval(script, { "k2" }, { "c", "d" }))
      cs = r:info("commandstats")
      assert.are.equal(2, cs.cmdstat_evalsha.calls)
      assert.are.equal(1, cs.cmdstat_eval.calls)
      assert.are.equal(42, r:eval("return 42"))
      local e = raises(r.eval, r, "return redis.call('NOSUCH')")
      assert.are.equal("redis", e.kind)
    end)

    it("connects over a unix socket and selects the database", function()
      local r <close> = redis.connect("unix://" .. private.dir .. "/redis.sock?db=2")
      assert.truthy(r:client("INFO"):find(" db=2 ", 1, true))
      r:set("in-db-2", "yes")
      local r0 <close> = redis.connect(private.url)
      assert.are.equal(rbe.null, r0:get("in-db-2"))
      r0:select(2)
      assert.are.equal("yes", r0:get("in-db-2"))
      r0:client("KILL", "ID", r0:client("ID"))  -- reconnects into db 2
      rbe.sleep(0.05)
      assert.are.equal("yes", r0:get("in-db-2"))
      r0:flushall()
    end)

    it("times out on a stalled server (DEBUG SLEEP), closes, then reconnects", function()
      local r <close> = redis.connect(private.url, { timeout = "150ms" })
      local other = rbe.spawn(function() return r:get("x") end)
      local t0 = rbe.now()
      local e = raises(r.call, r, "DEBUG", "SLEEP", "1.5")
      assert.are.equal("timeout", e.kind)
      assert.are.equal("ETIMEDOUT", e.code)
      assert.is_true(e.retryable)
      assert.truthy(e.message:find("connection closed", 1, true))
      assert.truthy(rbe.now() - t0 < 1.2)    -- not the server's 1.5 s
      -- the command queued behind it failed too
      local ok, e2 = rbe.try(other.join, other)
      assert.is_false(ok)
      assert.are.equal("timeout", e2.kind)
      assert.is_false(r:connected())
      rbe.sleep(1.5)
      assert.are.equal("PONG", r:ping())    -- reconnected
      assert.is_true(r:connected())
    end)

    it("times out under CLIENT PAUSE; with reconnect = false raises `closed`", function()
      local admin <close> = redis.connect(private.url)
      local r <close> = redis.connect(private.url, { timeout = "100ms", reconnect = false })
      admin:client("PAUSE", 1500, "ALL")
      local e = raises(r.ping, r)
      assert.are.equal("timeout", e.kind)
      e = raises(r.ping, r)
      assert.are.equal("closed", e.kind)
      assert.truthy(e.message:find("reconnect = false", 1, true))
      -- connecting while paused: the connect timeout applies
      local t0 = rbe.now()
      e = raises(redis.connect, private.url, { connect_timeout = "100ms" })
      assert.are.equal("timeout", e.kind)
      assert.is_true(e.retryable)
      assert.truthy(rbe.now() - t0 < 1.2)    -- not the 1.5 s pause
      rbe.sleep(1.5)
      admin:client("UNPAUSE")
      assert.are.equal("PONG", admin:ping())
    end)

    it("gives a retryable error when the server is killed, then reconnects", function()
      local r <close> = redis.connect(private.url)
      r:set("before", "1")
      local blocked = rbe.spawn(function() return r:blpop("nothing", 0) end)
      rbe.sleep(0.05)
      private.child:kill("KILL")
      private.child:wait()
      local ok, e = rbe.try(blocked.join, blocked)
      assert.is_false(ok)
      assert.are.equal("redis", e.kind)
      assert.is_true(e.retryable)
      assert.truthy(e.message:find("lost", 1, true))
      -- still down: the reconnect is refused, retryable
      e = raises(r.ping, r)
      assert.are.equal("ECONNREFUSED", e.code)
      assert.is_true(e.retryable)
      private.child:close()
      start_private()                      -- same port
      assert.are.equal("PONG", r:ping())
      assert.are.equal(rbe.null, r:get("before"))   -- a new, empty server
    end)

    it("a subscription survives its connection being killed", function()
      local r <close> = redis.connect(private.url)
      local sub <close> = r:subscribe("news")
      r:client("KILL", "TYPE", "pubsub")
      local e = raises(sub.next, sub, "2s")
      assert.are.equal("redis", e.kind)
      assert.is_true(e.retryable)
      -- the next call reconnects and subscribes again
      assert.is_nil(sub:next("50ms"))
      assert.are.equal(1, r:publish("news", "back"))
      assert.are.equal("back", sub:next("2s").payload)
    end)
  end)
end)
