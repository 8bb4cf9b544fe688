-- tests/helper.lua: loaded by busted before the specs (see run.lua).  After
-- every spec it checks that the core's live waits, tasks, handles and
-- registry references, and the process's open file descriptors, came back
-- to where they were: a spec that leaks a timer, a child process, a task or
-- a descriptor fails here.
local rbe = require "rbe"
local fs = require "rbe.fs"
local busted = require "busted"
local before_each, after_each = busted.before_each, busted.after_each

local before

-- libuv opens a reserve descriptor once, at the first child's exit; let
-- that happen before the first spec so it is not counted as a leak
require("rbe.proc").run { "true" }

local function counts()
  -- pooled idle connections are not leaks: let the clients drop them
  for _, m in ipairs { "rbe.http", "rbe.pg", "rbe.redis" } do
    local mod = package.loaded[m]
    if type(mod) == "table" and type(mod.close_idle) == "function" then mod.close_idle() end
  end
  local c = rbe._counts()
  c.fds = #fs.list("/proc/self/fd")
  return c
end

local function settled(c)
  return c.waits == 0 and c.tasks == 1 and c.handles == 0
     and c.refs == before.refs and c.fds <= before.fds
end

before_each(function()
  before = counts()
end)

after_each(function()
  -- closes and kills finish on the next loop turns: give them a moment
  local deadline = rbe.now() + 10
  local c = counts()
  while not settled(c) and rbe.now() < deadline do
    rbe.sleep(0.01)
    coroutine.yield() -- one more loop turn: close callbacks run
    collectgarbage()
    c = counts()
  end
  assert(settled(c), ("leak after spec: waits=%d tasks=%d (want 1) "
    .. "handles=%d refs=%d (before: %d) fds=%d (before: %d)"):format(c.waits,
    c.tasks, c.handles, c.refs, before.refs, c.fds, before.fds))
end)
