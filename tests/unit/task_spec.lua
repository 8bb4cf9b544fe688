-- Tasks, the await bridge and the combinators, on the real loop.
local rbe = require "rbe"

local function closer(log, name)
  return setmetatable({}, { __close = function() log[#log + 1] = name end })
end

describe("#core tasks", function()
  it("spawn runs a function with arguments and join returns its results", function()
    local t = rbe.spawn(function(a, b) rbe.sleep("5ms"); return a + b, "x" end, 2, 3)
    assert.are.equal("task", tostring(t):match("^task"))
    local s, x = t:join()
    assert.are.equal(5, s)
    assert.are.equal("x", x)
    assert.are.equal("done", t:status())
    -- joining a finished task again gives the same results at once
    assert.are.equal(5, (t:join()))
  end)

  it("a task starts at the next loop turn, not inside spawn", function()
    local ran = false
    local t = rbe.spawn(function() ran = true end)
    assert.is_false(ran)
    assert.are.equal("ready", t:status())
    t:join()
    assert.is_true(ran)
  end)

  it("an error inside a spawned task surfaces at join as an error object with a traceback", function()
    local t = rbe.spawn(function() rbe.sleep(0.001); error("kaput") end)
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.is_true(rbe.is_error(err))
    assert.are.equal("lua", err.kind)
    assert.truthy(err.message:find("kaput", 1, true))
    assert.truthy(err.message:find("task_spec.lua:%d+"))
    assert.truthy(err.traceback:find("stack traceback", 1, true))
    assert.are.equal("failed", t:status())
  end)

  it("error objects raised in a task keep their fields", function()
    local t = rbe.spawn(function()
      error(rbe.error("proc", "exit 3", { code = 3, retryable = true }))
    end)
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.are.equal("proc", err.kind)
    assert.are.equal(3, err.code)
    assert.is_true(err.retryable)
    assert.are.equal("proc: exit 3 (3)", tostring(err))
    assert.is_string(err.traceback)
  end)

  it("cancelling a task mid-sleep wakes it with a cancelled error and runs its to-be-closed variables", function()
    local log = {}
    local t = rbe.spawn(function()
      local c <close> = closer(log, "closed")
      rbe.sleep(30)
      log[#log + 1] = "not reached"
    end)
    rbe.sleep(0.01)
    assert.are.equal("waiting", t:status())
    local t0 = rbe.now()
    t:cancel()
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.are.equal("cancelled", err.kind)
    assert.are.equal("cancelled", t:status())
    assert.are.same({ "closed" }, log)
    assert.is_true(rbe.now() - t0 < 5)
  end)

  it("a task cancelled before it starts never runs", function()
    local ran = false
    local t = rbe.spawn(function() ran = true end)
    t:cancel()
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.are.equal("cancelled", err.kind)
    assert.is_false(ran)
  end)

  it("a cancelled task that catches the error cannot wait again", function()
    local second
    local t = rbe.spawn(function()
      pcall(rbe.sleep, 30)
      local ok, e = pcall(rbe.sleep, 30)
      second = e
      return "handled"
    end)
    rbe.sleep(0.005)
    t:cancel()
    assert.are.equal("handled", t:join())
    assert.are.equal("cancelled", second.kind)
  end)

  it("cancelling a finished task is harmless", function()
    local t = rbe.spawn(function() return 1 end)
    t:join()
    t:cancel()
    assert.are.equal("done", t:status())
  end)

  it("a task cannot join itself", function()
    local t
    t = rbe.spawn(function() return pcall(function() return t:join() end) end)
    local ok, msg = t:join()
    assert.is_false(ok)
    assert.truthy(tostring(msg):find("cannot join itself", 1, true))
  end)

  it("10,000 concurrent tasks all run and finish", function()
    local tasks, sum = {}, 0
    for i = 1, 10000 do
      tasks[i] = rbe.spawn(function() rbe.sleep(0.02); sum = sum + i; return i end)
    end
    for i = 1, 10000 do assert.are.equal(i, tasks[i]:join()) end
    assert.are.equal(10000 * 10001 // 2, sum)
  end)

  it("plain coroutine.yield at the top of a task just reschedules it", function()
    local order = {}
    local a = rbe.spawn(function()
      for i = 1, 3 do order[#order + 1] = "a" .. i; coroutine.yield() end
    end)
    local b = rbe.spawn(function()
      for i = 1, 3 do order[#order + 1] = "b" .. i; coroutine.yield() end
    end)
    a:join(); b:join()
    assert.are.same({ "a1", "b1", "a2", "b2", "a3", "b3" }, order)
  end)
end)

describe("#core waits through user coroutines", function()
  it("a coroutine.wrap iterator can sleep", function()
    local gen = coroutine.wrap(function()
      for i = 1, 3 do rbe.sleep(0.002); coroutine.yield(i * 10) end
    end)
    assert.are.same({ 10, 20, 30 }, { gen(), gen(), gen() })
  end)

  it("nested coroutines pass waits through every level", function()
    local inner = coroutine.wrap(function()
      local deeper = coroutine.wrap(function()
        rbe.sleep(0.002)
        coroutine.yield("deep")
      end)
      coroutine.yield(deeper())
    end)
    assert.are.equal("deep", inner())
  end)

  it("coroutine.resume gets the iterator's values after waits", function()
    local co = coroutine.create(function(x)
      rbe.sleep(0.001)
      local y = coroutine.yield(x + 1)
      rbe.sleep(0.001)
      return y * 2
    end)
    assert.are.same({ true, 2 }, { coroutine.resume(co, 1) })
    assert.are.same({ true, 14 }, { coroutine.resume(co, 7) })
    assert.are.equal("dead", coroutine.status(co))
  end)

  it("an error after a wait inside a wrapped coroutine propagates", function()
    local gen = coroutine.wrap(function() rbe.sleep(0.001); error("inner boom") end)
    local ok, err = pcall(gen)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("inner boom", 1, true))
  end)

  it("a timeout reaches a wait inside a coroutine", function()
    local gen = coroutine.wrap(function() rbe.sleep(30) end)
    local ok, err = pcall(rbe.timeout, 0.02, gen)
    assert.is_false(ok)
    assert.are.equal("timeout", err.kind)
  end)

  it("waiting across a C boundary gives a readable error", function()
    local ok, err = pcall(table.sort, { 3, 1, 2 }, function(a, b)
      rbe.sleep(0)
      return a < b
    end)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("cannot wait here", 1, true))
  end)
end)

describe("#core rbe.timeout", function()
  it("returns fn's results when it finishes in time", function()
    local a, b = rbe.timeout("1s", function(x) rbe.sleep(0.001); return x, "y" end, "x")
    assert.are.equal("x", a)
    assert.are.equal("y", b)
  end)

  it("cancels the in-flight wait and raises a timeout error object", function()
    local t0 = rbe.now()
    local ok, err = pcall(rbe.timeout, "50ms", rbe.sleep, 30)
    assert.is_false(ok)
    assert.is_true(rbe.is_error(err))
    assert.are.equal("timeout", err.kind)
    assert.are.equal("ETIMEDOUT", err.code)
    assert.is_true(err.retryable)
    assert.truthy(err.message:find("0.05", 1, true))
    local dt = rbe.now() - t0
    assert.is_true(dt >= 0.045 and dt < 5)
  end)

  it("inner timeout shorter than outer: the inner fires, the outer goes on", function()
    local ok, err = pcall(rbe.timeout, 5, function()
      local iok, ierr = pcall(rbe.timeout, 0.01, rbe.sleep, 30)
      assert(not iok and ierr.kind == "timeout")
      rbe.sleep(0.005) -- still allowed: only the inner scope expired
      return "outer ok"
    end)
    assert.is_true(ok)
    assert.are.equal("outer ok", err)
  end)

  it("outer timeout shorter than inner: the outer's error passes through the inner", function()
    local inner_saw
    local ok, err = pcall(rbe.timeout, 0.02, function()
      local iok, ierr = pcall(rbe.timeout, 10, rbe.sleep, 30)
      inner_saw = ierr
      rbe.sleep(1) -- the expired outer scope fails this wait at once
      return "not reached"
    end)
    assert.is_false(ok)
    assert.are.equal("timeout", err.kind)
    assert.truthy(err.message:find("0.02", 1, true))
    assert.are.equal("timeout", inner_saw.kind)
  end)

  it("does not fire after fn returned", function()
    rbe.timeout(0.01, function() end)
    rbe.sleep(0.03)
    rbe.sleep(0.001)
  end)

  it("runs to-be-closed variables of fn when it times out", function()
    local log = {}
    pcall(rbe.timeout, 0.01, function()
      local c <close> = closer(log, "closed")
      rbe.sleep(30)
    end)
    assert.are.same({ "closed" }, log)
  end)

  it("rejects bad durations with a clear message", function()
    local ok, err = pcall(rbe.timeout, "5 parsecs", function() end)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("bad duration '5 parsecs'", 1, true))
  end)
end)

describe("#core combinators", function()
  it("rbe.all returns each function's first result in order", function()
    local a, b, c = rbe.all {
      function() rbe.sleep(0.02); return "a" end,
      function() return "b" end,
      function() rbe.sleep(0.01); return "c" end,
    }
    assert.are.same({ "a", "b", "c" }, { a, b, c })
  end)

  it("rbe.all runs concurrently", function()
    -- all three are asleep at once (counted, not timed)
    local active, most = 0, 0
    local function sleeper()
      active = active + 1
      most = math.max(most, active)
      rbe.sleep(0.05)
      active = active - 1
    end
    rbe.all { sleeper, sleeper, sleeper }
    assert.are.equal(3, most)
    assert.are.equal(0, active)
  end)

  it("rbe.all: the first error cancels the rest and is re-raised", function()
    local log = {}
    local ok, err = pcall(rbe.all, {
      function() local c <close> = closer(log, "slow closed"); rbe.sleep(30) end,
      function() rbe.sleep(0.01); error(rbe.error("http", "503 from api")) end,
    })
    assert.is_false(ok)
    assert.are.equal("http", err.kind)
    assert.are.same({ "slow closed" }, log)
  end)

  it("rbe.parallel respects its limit and keeps results in order", function()
    local running, peak, fns = 0, 0, {}
    for i = 1, 40 do
      fns[i] = function()
        running = running + 1
        if running > peak then peak = running end
        rbe.sleep(0.002 * (i % 3))
        running = running - 1
        return i * i
      end
    end
    local r = rbe.parallel(fns, { limit = 4 })
    assert.are.equal(4, peak)
    assert.are.equal(40, r.n)
    for i = 1, 40 do assert.are.equal(i * i, r[i]) end
  end)

  it("rbe.parallel stops starting new work after a failure", function()
    local started = 0
    local fns = {}
    for i = 1, 20 do
      fns[i] = function()
        started = started + 1
        rbe.sleep(0.005)
        if i == 2 then error("fail at 2") end
      end
    end
    local ok, err = pcall(rbe.parallel, fns, { limit = 2 })
    assert.is_false(ok)
    assert.truthy(tostring(err.message):find("fail at 2", 1, true))
    assert.is_true(started < 20)
  end)

  it("rbe.parallel rejects a bad limit", function()
    assert.has_error(function() rbe.parallel({ function() end }, { limit = 0 }) end)
  end)

  it("rbe.race returns the first to finish and cancels the others", function()
    local log = {}
    local v = rbe.race {
      function() local c <close> = closer(log, "loser closed"); rbe.sleep(30) end,
      function() rbe.sleep(0.01); return "fast" end,
    }
    assert.are.equal("fast", v)
    assert.are.same({ "loser closed" }, log)
  end)

  it("a timeout around rbe.all cancels the children", function()
    local log = {}
    local ok, err = pcall(rbe.timeout, 0.02, rbe.all, {
      function() local c <close> = closer(log, "a"); rbe.sleep(30) end,
      function() local c <close> = closer(log, "b"); rbe.sleep(30) end,
    })
    assert.is_false(ok)
    assert.are.equal("timeout", err.kind)
    table.sort(log)
    assert.are.same({ "a", "b" }, log)
  end)

  it("rbe.wait_any returns the index of the first finished task", function()
    local t1 = rbe.spawn(rbe.sleep, 0.05)
    local t2 = rbe.spawn(rbe.sleep, 0.001)
    assert.are.equal(2, rbe.wait_any { t1, t2 })
    t1:cancel()
    pcall(t1.join, t1)
  end)
end)

describe("#core values", function()
  it("durations", function()
    assert.are.equal(0.25, rbe.duration("250ms"))
    assert.are.equal(5, rbe.duration("5s"))
    assert.are.equal(120, rbe.duration("2m"))
    assert.are.equal(3600, rbe.duration("1h"))
    assert.are.equal(90, rbe.duration("1m30s"))
    assert.are.equal(1.5, rbe.duration(1.5))
    for _, bad in ipairs { "", "5", "fast", "-1s", "5x", "1s2" } do
      local ok, err = pcall(rbe.duration, bad)
      assert.is_false(ok, bad)
      assert.truthy(tostring(err):find("bad duration", 1, true), bad)
    end
    assert.has_error(function() rbe.duration(-1) end)
    assert.has_error(function() rbe.duration({}) end)
    assert.has_error(function() rbe.sleep("soon") end)
  end)

  it("rbe.now is monotonic and advances across sleeps", function()
    local a = rbe.now()
    rbe.sleep(0.02)
    local b = rbe.now()
    assert.is_true(b - a >= 0.019)
    assert.is_number(rbe.time())
    assert.is_true(math.abs(rbe.time() - os.time()) < 2)
  end)

  it("rbe.env reads variables, uses defaults and names the missing one", function()
    rbe.setenv("RBE_SPEC_VAR", "v1")
    assert.are.equal("v1", rbe.env("RBE_SPEC_VAR"))
    rbe.setenv("RBE_SPEC_VAR", nil)
    assert.are.equal("dflt", rbe.env("RBE_SPEC_VAR", "dflt"))
    local ok, err = pcall(rbe.env, "RBE_SPEC_VAR")
    assert.is_false(ok)
    assert.are.equal("env", err.kind)
    assert.truthy(err.message:find("RBE_SPEC_VAR", 1, true))
  end)

  it("rbe.try returns ok and values, or false and an error object", function()
    assert.are.same({ true, 1, 2 }, { rbe.try(function(a) return a, 2 end, 1) })
    local ok, err = rbe.try(function() error("plain string") end)
    assert.is_false(ok)
    assert.are.equal("lua", err.kind)
    assert.truthy(err.message:find("plain string", 1, true))
    local ok2, err2 = rbe.try(rbe.timeout, 0.001, rbe.sleep, 1)
    assert.is_false(ok2)
    assert.are.equal("timeout", err2.kind)
  end)

  it("secrets print as *** and are revealed only on purpose", function()
    local s = rbe.secret("hunter2")
    assert.are.equal("***", tostring(s))
    assert.are.equal("hunter2", rbe.reveal(s))
    assert.is_true(rbe.is_secret(s))
    local h = "Bearer " .. s
    assert.is_true(rbe.is_secret(h))
    assert.are.equal("***", tostring(h))
    assert.are.equal("Bearer hunter2", rbe.reveal(h))
    assert.are.equal("plain", rbe.reveal("plain"))
    assert.are.equal(s, rbe.secret(s))
    assert.falsy(string.format("%s", s):find("hunter2"))
  end)

  it("rbe.null is a unique value that prints as null", function()
    assert.are.equal("null", tostring(rbe.null))
    assert.are.equal(rbe.null, require("rbe").null)
    assert.are_not.equal(nil, rbe.null)
  end)

  it("cjson is built in", function()
    local cjson = require "cjson"
    assert.are.same({ a = { 1, 2 } }, cjson.decode(cjson.encode({ a = { 1, 2 } })))
  end)
end)

describe("#core rbe.shield", function()
  it("lets cleanup wait in a cancelled task, then the cancellation stands", function()
    local log = {}
    local t = rbe.spawn(function()
      local c <close> = setmetatable({}, { __close = function()
        rbe.shield(function() rbe.sleep(0.01); log[#log + 1] = "undo waited" end)
      end })
      rbe.sleep(30)
    end)
    rbe.sleep(0.005)
    t:cancel()
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.are.equal("cancelled", err.kind)
    assert.are.same({ "undo waited" }, log)
  end)

  it("holds off a cancel that arrives during the shielded wait", function()
    local log = {}
    local t = rbe.spawn(function()
      rbe.shield(function() rbe.sleep(0.05); log[#log + 1] = "shielded done" end)
      rbe.sleep(30)
      log[#log + 1] = "not reached"
    end)
    rbe.sleep(0.01)
    t:cancel()
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.are.equal("cancelled", err.kind)
    assert.are.same({ "shielded done" }, log)
  end)

  it("a timeout inside the shield still applies; an outer expired one does not", function()
    local ok, err = pcall(rbe.timeout, 0.01, function()
      rbe.sleep(0.03) -- the outer expires here
    end)
    assert.are.equal("timeout", err.kind)
    local inner
    pcall(rbe.timeout, 0.01, function()
      pcall(rbe.sleep, 1)
      rbe.shield(function()
        rbe.sleep(0.005) -- allowed: the expired outer scope is held off
        local iok, ierr = pcall(rbe.timeout, 0.01, rbe.sleep, 30)
        inner = ierr
      end)
    end)
    assert.are.equal("timeout", inner.kind)
  end)
end)

describe("#core combinators with nothing to do", function()
  it("rbe.all{} and rbe.parallel({}) return at once", function()
    assert.are.equal(0, select("#", rbe.all {}))
    assert.are.equal(0, rbe.parallel({}).n)
  end)

  it("rejects things that are not functions, naming the item", function()
    local ok, err = pcall(rbe.all, { function() end, 42 })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("item 2 is a number", 1, true))
  end)
end)

describe("#core cancel reasons", function()
  it("task:cancel(reason) names the reason; interrupted marks an operator's Ctrl-C", function()
    local t = rbe.spawn(rbe.sleep, 30)
    rbe.sleep(0.005)
    t:cancel("the console line was abandoned")
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.truthy(err.message:find("the console line was abandoned", 1, true))
    assert.is_nil(err.interrupted)
    local t2 = rbe.spawn(rbe.sleep, 30)
    rbe.sleep(0.005)
    t2:cancel("interrupted (Ctrl-C)", { interrupted = true })
    local _, err2 = pcall(t2.join, t2)
    assert.is_true(err2.interrupted)
  end)
end)
