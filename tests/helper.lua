-- tests/helper.lua: loaded by busted before the specs (see run.lua).  After
-- every spec it checks that the core's live waits, tasks, handles and
-- registry references came back to where they were: a spec that leaks a
-- timer, a child process or a task fails here.
local rbe = require "rbe"
local busted = require "busted"
local before_each, after_each = busted.before_each, busted.after_each

local before

local function settled(c)
  return c.waits == 0 and c.tasks == 1 and c.handles == 0
     and c.refs == before.refs
end

before_each(function()
  before = rbe._counts()
end)

after_each(function()
  -- closes and kills finish on the next loop turns: give them a moment
  local deadline = rbe.now() + 10
  local c = rbe._counts()
  while not settled(c) and rbe.now() < deadline do
    rbe.sleep(0.01)
    coroutine.yield() -- one more loop turn: close callbacks run
    collectgarbage()
    c = rbe._counts()
  end
  assert(settled(c), ("leak after spec: waits=%d tasks=%d (want 1) "
    .. "handles=%d refs=%d (before: %d)"):format(c.waits, c.tasks,
    c.handles, c.refs, before.refs))
end)
