-- rbe: the engine's public Lua API (require "rbe", also the global `rbe`).
-- Tasks, timeouts and sleeps come from the C core; the combinators (all,
-- race, parallel), try, env and log are built here on top of them.  This
-- file also makes waits pass through user coroutines: coroutine.resume and
-- coroutine.wrap forward a wait's yield up to the scheduler and hand the
-- result back to the inner coroutine.
local core = require "rbe.core"
local aux = require "rbe.aux"
local timer = require "rbe.timer"
local sys = require "rbe.sys"

local co_resume, co_yield, co_create, co_close, co_isyieldable =
  coroutine.resume, coroutine.yield, coroutine.create, coroutine.close,
  coroutine.isyieldable
local select, type, error, pcall, ipairs, tostring, setmetatable, getmetatable =
  select, type, error, pcall, ipairs, tostring, setmetatable, getmetatable
local unpack = table.unpack
local SENTINEL = core._sentinel

local M = {}

M.spawn = core.spawn
M.timeout = core.timeout
M.shield = core.shield
M.wait_any = core.wait_any
M.current = core.current
M.interrupted = core.interrupted
M.sleep = timer.sleep
M.now = timer.now
M.time = timer.time
M.null = aux.null
M.error = aux.error
M.is_error = aux.is_error
M.duration = aux.duration
M.secret = aux.secret
M.reveal = aux.reveal
M.is_secret = aux.is_secret
M.setenv = aux.setenv
M.version = core.version
M.versions = core.versions
M._counts = aux._counts
M.sha256 = sys.sha256
M.isatty = sys.isatty
M.whoami = sys.whoami
M.lock = sys.lock
M.read_line = sys.read_line

---------------------------------------------------------------------------
-- waits through user coroutines

local pass
local function cannot_wait()
  core._cancel_current_wait()
  return aux.error("usage", "cannot wait here: a coroutine that waits was "
    .. "resumed from a place that cannot yield (a C boundary)")
end

-- ok, first... are what co_resume returned; a wait inside co yields the
-- sentinel, which we yield upward and whose answer we resume co with.
pass = function(co, ok, first, ...)
  if ok and first == SENTINEL then
    if co_isyieldable() then
      return pass(co, co_resume(co, co_yield(SENTINEL)))
    end
    return pass(co, co_resume(co, false, cannot_wait()))
  end
  return ok, first, ...
end

function coroutine.resume(co, ...)
  return pass(co, co_resume(co, ...))
end

local function unwrap(co, ok, ...)
  if ok then return ... end
  local err = ...
  co_close(co)
  if type(err) == "string" then error(err, 0) end
  error(err, 0)
end

function coroutine.wrap(f)
  local co = co_create(f)
  return function(...)
    return unwrap(co, pass(co, co_resume(co, ...)))
  end
end

---------------------------------------------------------------------------
-- errors

local function as_error(e)
  if type(e) == "table" or aux.is_error(e) then return e end
  return aux.error("lua", tostring(e))
end
M.as_error = as_error

local function try_result(ok, ...)
  if ok then return true, ... end
  return false, as_error((...))
end

-- rbe.try(f, ...) -> true, results... | false, err (an error object)
function M.try(f, ...)
  return try_result(pcall(f, ...))
end

---------------------------------------------------------------------------
-- combinators

local function check_fns(fns, name)
  if type(fns) ~= "table" then
    error(name .. ": list of functions expected, got " .. type(fns), 3)
  end
  local n = fns.n or #fns
  for i = 1, n do
    local f = fns[i]
    local mt = getmetatable(f)
    if type(f) ~= "function" and not (mt and mt.__call) then
      error(("%s: item %d is a %s, not a function"):format(name, i, type(f)), 3)
    end
  end
  return n
end

-- Cancel the tasks and wait until they have unwound (their to-be-closed
-- variables and error handlers ran), unless we are cancelled ourselves.
local function cancel_and_settle(tasks)
  for _, t in ipairs(tasks) do t:cancel() end
  while true do
    local live = {}
    for _, t in ipairs(tasks) do
      if not t:done() then live[#live + 1] = t end
    end
    if #live == 0 then return end
    if not pcall(core.wait_any, live, true) then return end
  end
end

local function failed(t)
  local st = t:status()
  return st == "failed" or st == "cancelled"
end

-- Wait until every task has finished; the first failure (first_error()
-- or the failed task's own error) cancels the rest, lets them unwind and
-- is re-raised, as is our own cancellation or timeout.
local function await_all(tasks, first_error)
  local ok, err = pcall(function()
    while true do
      local live = {}
      for _, t in ipairs(tasks) do
        if failed(t) then error(first_error and first_error() or t:error(), 0) end
        if not t:done() then live[#live + 1] = t end
      end
      if #live == 0 then return end
      core.wait_any(live)
    end
  end)
  if not ok then
    cancel_and_settle(tasks)
    error(err, 0)
  end
end

local function first_results(tasks, n)
  local results = { n = n }
  for i = 1, n do results[i] = (tasks[i]:result()) end
  return results
end

-- rbe.all{f1, f2, ...} -> r1, r2, ...  (each function's first result)
function M.all(fns)
  local n = check_fns(fns, "rbe.all")
  local tasks = {}
  for i = 1, n do tasks[i] = core.spawn(fns[i]) end
  await_all(tasks)
  return unpack(first_results(tasks, n), 1, n)
end

-- Turn what a function raised into an error object with a traceback.
local function traced(e)
  if type(e) == "table" then
    if aux.is_error(e) and e.traceback == nil then e.traceback = debug.traceback("", 2) end
    return e
  end
  local obj = aux.error("lua", tostring(e))
  obj.traceback = debug.traceback("", 2)
  return obj
end

-- rbe.parallel(fns, {limit = N}) -> results (array, results.n), at most N
-- running at once; the first failure cancels the rest and is raised.
-- N worker tasks take the functions in order, so the cost per function
-- does not grow with N.
function M.parallel(fns, opts)
  local n = check_fns(fns, "rbe.parallel")
  local limit = opts and opts.limit or math.max(n, 1)
  if math.type(limit) ~= "integer" or limit < 1 then
    error("rbe.parallel: limit must be a positive integer", 2)
  end
  local results = { n = n }
  local next_i, failure = 1, nil
  local function worker()
    while not failure and next_i <= n do
      local i = next_i
      next_i = i + 1
      local ok, v = xpcall(fns[i], traced)
      if not ok then
        failure = failure or v
        error(v, 0)
      end
      results[i] = v
    end
  end
  local workers = {}
  for w = 1, math.min(limit, n) do workers[w] = core.spawn(worker) end
  await_all(workers, function() return failure end)
  return results
end

-- rbe.race{f1, f2, ...} -> the results of the first function to finish
-- (or its error); the others are cancelled.
function M.race(fns)
  local n = check_fns(fns, "rbe.race")
  if n == 0 then error("rbe.race: empty list", 2) end
  local tasks = {}
  for i = 1, n do tasks[i] = core.spawn(fns[i]) end
  local ok, i = pcall(core.wait_any, tasks)
  local winner = ok and tasks[i]
  local losers = {}
  for _, t in ipairs(tasks) do
    if t ~= winner then losers[#losers + 1] = t end
  end
  cancel_and_settle(losers)
  if not ok then error(i, 0) end
  return winner:result()
end

---------------------------------------------------------------------------
-- environment and logging

-- rbe.env(name[, default]) -> string; raises if unset and no default
function M.env(name, default)
  if type(name) ~= "string" then
    error("rbe.env: variable name expected, got " .. type(name), 2)
  end
  local v = os.getenv(name)
  if v ~= nil then return v end
  if select("#", default) > 0 and default ~= nil then return default end
  local e = aux.error("env", "environment variable " .. name
    .. " is not set (export it, or give rbe.env a default)")
  e.code = "ENOTSET"
  error(e, 2)
end

local log_levels = { debug = 10, info = 20, warn = 30, error = 40 }
M.log_level = os.getenv("RBE_LOG") or "info"

-- rbe.log(level, fmt, ...) or rbe.log(fmt, ...): one line on stderr
function M.log(level, ...)
  local args
  if log_levels[level] then args = table.pack(...)
  else args = table.pack(level, ...); level = "info" end
  if log_levels[level] < (log_levels[M.log_level] or 20) then return end
  local msg
  if args.n == 1 then msg = tostring(args[1])
  else
    for i = 2, args.n do
      local v = args[i]
      if type(v) ~= "number" and type(v) ~= "string" then args[i] = tostring(v) end
    end
    msg = tostring(args[1]):format(unpack(args, 2, args.n))
  end
  io.stderr:write(("%s %-5s %s\n"):format(os.date("%H:%M:%S"), level, msg))
end

return M
