-- bench/tasks.lua [N]: memory of N concurrently sleeping tasks above the
-- process's baseline RSS, against N suspended plain Lua coroutines (the
-- floor: what a coroutine costs before rbe's task bookkeeping).  Each is
-- measured in a fresh child process so freed memory is not reused.
local rbe = require "rbe"
local N = tonumber(arg[1] or 10000)
local mode = arg[2]

local function rss_kb()
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("a"); f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

if mode == "coroutines" then
  collectgarbage(); collectgarbage()
  local base = rss_kb()
  local cos = {}
  for i = 1, N do
    cos[i] = coroutine.create(function() coroutine.yield() end)
    coroutine.resume(cos[i])
  end
  collectgarbage()
  print(rss_kb() - base)
  return
elseif mode == "tasks" then
  collectgarbage(); collectgarbage()
  local base = rss_kb()
  local tasks = {}
  for i = 1, N do tasks[i] = rbe.spawn(rbe.sleep, 1) end
  rbe.sleep(0.2) -- all started and sleeping
  collectgarbage()
  print(rss_kb() - base)
  for i = 1, N do tasks[i]:join() end
  return
end

local proc = require "rbe.proc"
local self = debug.getinfo(1, "S").source:sub(2)
local exe = arg[-1]
local function measure(m)
  return tonumber(proc.run({ exe, self, tostring(N), m }).stdout)
end
local task_kb, co_kb = measure("tasks"), measure("coroutines")
print(("%d concurrently sleeping tasks (fresh process each):"):format(N))
print(("  RSS above baseline, rbe tasks      %6.1f MB  (goal <= 20 MB)"):format(task_kb / 1024))
print(("  RSS above baseline, Lua coroutines %6.1f MB  (floor)"):format(co_kb / 1024))
print(("  ratio tasks / coroutines = %.2fx"):format(task_kb / math.max(co_kb, 1)))
