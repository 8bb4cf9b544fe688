-- rbe.runner: runs a loaded playbook (rbe.playbook) as a saga.  Steps run
-- in order (parallel groups concurrently, with a limit); each has its
-- timeout, retries and the remaining phase/run budget as deadlines; a
-- failed step undoes every completed step in reverse order unless its
-- on_failure says otherwise.  Everything is journaled (rbe.journal) with
-- an fsync at each step boundary, so `rbe resume` can continue a crashed or
-- interrupted run without repeating completed steps.
local rbe = require "rbe"
local fs = require "rbe.fs"
local journal = require "rbe.journal"
local progress = require "rbe.progress"
local pb = require "rbe.playbook"

local M = {}

M.EXIT = pb.EXIT

local FAILURE = {}   -- metatable of a step failure travelling up the tree

local Run = {}
Run.__index = Run

---------------------------------------------------------------------------
-- masking

-- mask(s): secret var values and URL passwords replaced by ***
local function make_mask(book)
  local secrets = {}
  for k in pairs(book.secret_vars or {}) do
    local v = rbe.reveal(book.vars[k])
    if type(v) == "string" and #v >= 3 then secrets[#secrets + 1] = v end
  end
  table.sort(secrets, function(a, b) return #a > #b end)
  return function(s)
    if type(s) ~= "string" then return s end
    for _, v in ipairs(secrets) do
      local i = 1
      while true do
        local a, b = s:find(v, i, true)
        if not a then break end
        s = s:sub(1, a - 1) .. "***" .. s:sub(b + 1)
        i = a + 3
      end
    end
    return (s:gsub("(%a[%w+.-]*://[^/:@%s]*):[^@/%s]+@", "%1:***@"))
  end
end
M.make_mask = make_mask

local function errtext(e)
  if rbe.is_error(e) then return tostring(e) end
  if type(e) == "table" and getmetatable(e) == FAILURE then return errtext(e.err) end
  return tostring(e)
end

---------------------------------------------------------------------------
-- construction

-- runner.new(book, opts) -> run
-- opts: yes, reason, as, state_dir, json, quiet, verbose, no_color,
--       fsync (default true), resume (state from journal), rerun_unknown,
--       skip_unknown, force, progress (a renderer; default chosen from the
--       terminal)
function M.new(book, opts)
  local who = rbe.whoami()
  local budget = book.root.budget and rbe.duration(book.root.budget)
  local mask = make_mask(book)
  local run = setmetatable({
    book = book, opts = opts, who = who, user = opts.as or who.user,
    mask = mask, budget = budget,
    status = {}, attempts = {}, durations = {}, errors = {}, reasons = {},
    started = {}, done_order = {}, undo_log = {}, gates = {}, phases = {},
    manual_log = {}, warnings = {}, tolerated = {}, index = 0,
  }, Run)
  run.state_dir = journal.state_dir(opts.state_dir)
  run.progress = opts.progress or progress.choose {
    json = opts.json, quiet = opts.quiet, verbose = opts.verbose,
    no_color = opts.no_color, budget = budget, mask = mask }
  run.ctx = {
    vars = book.vars, results = {}, playbook = book.name, dry = false,
    log = function(fmt, ...)
      local msg = select("#", ...) > 0 and tostring(fmt):format(...) or tostring(fmt)
      run:emit { ev = "log", step = run.ctx.step, message = msg }
    end,
  }
  return run
end

function Run:emit(ev, sync)
  if self.journal then self.journal:write(ev, sync) end
  self.progress:event(ev)
end

---------------------------------------------------------------------------
-- budgets and limits

local function budget_error(scope)
  local e = rbe.error("budget", ("%s budget of %s is used up"):format(
    scope.label, progress.fmt_dur(scope.budget)))
  e.code = "EBUDGET"
  return e
end

-- The time limit for a call in this scope: the node's own timeout or the
-- scope's remaining budget, whichever is sooner.  Returns limit, source.
function Run:limit(node_timeout, scope)
  local t = node_timeout and rbe.duration(node_timeout)
  if scope.deadline then
    local left = scope.deadline - rbe.now()
    if scope.budget_mode == "warn" then
      if left <= 0 and not scope.warned then
        scope.warned = true
        self:emit { ev = "warn", message = budget_error(scope).message
          .. " (budget_mode = warn: going on)" }
        self.warnings[#self.warnings + 1] = budget_error(scope).message
      end
    else
      if left <= 0 then error(budget_error(scope), 0) end
      if not t or left < t then return left, "budget" end
    end
  end
  return t, "timeout"
end

-- Call fn(...) under the limit; a budget expiry becomes a budget error.
function Run:limited(node_timeout, scope, fn, ...)
  local lim, source = self:limit(node_timeout, scope)
  if not lim then return fn(...) end
  local res = table.pack(rbe.try(rbe.timeout, lim, fn, ...))
  if res[1] then return table.unpack(res, 2, res.n) end
  local err = res[2]
  if err.kind == "timeout" and source == "budget" then
    err = budget_error(scope)
  end
  error(err, 0)
end

---------------------------------------------------------------------------
-- operator interaction

function Run:confirm(node, question)
  if self.opts.yes then
    self:emit({ ev = "manual_confirm", step = node.name, by = self.user, auto = true }, true)
    return true
  end
  while true do
    local a = self.progress:ask(question)
    if a == nil then return false, "no answer (end of input)" end
    a = a:lower():match("^%s*(.-)%s*$")
    if a == "y" or a == "yes" or a == "done" then
      self:emit({ ev = "manual_confirm", step = node.name, by = self.user,
                  auto = false, answer = a }, true)
      return true
    end
    if a == "n" or a == "no" or a == "abort" then return false, "declined by " .. self.user end
  end
end

---------------------------------------------------------------------------
-- executing nodes

local function failure(node, err, policy)
  return setmetatable({ node = node, err = err, policy = policy }, FAILURE)
end

local function is_interrupt(err)
  return rbe.is_error(err) and err.kind == "cancelled"
     and (err.interrupted == true or rbe.interrupted())
end

function Run:record_end(node, status, t0, err, extra)
  local name = node.name
  self.status[name] = status
  self.durations[name] = rbe.now() - t0
  if err then self.errors[name] = errtext(err) end
  local ev = { ev = "step_end", step = name, kind = node.kind, status = status,
               attempts = self.attempts[name], duration = self.durations[name],
               error = err and self.mask(errtext(err)) or nil }
  for k, v in pairs(extra or {}) do ev[k] = v end
  self:emit(ev, true)
end

function Run:skip(node, reason, status)
  self.status[node.name] = status or "skipped"
  self.reasons[node.name] = reason
  self.durations[node.name] = 0
  self:emit({ ev = "step_skip", step = node.name, kind = node.kind,
              status = status or "skipped", reason = reason,
              index = self.index }, true)
end

-- What a previous (crashed or interrupted) run of this id already did.
function Run:from_previous(node)
  local st = self.prev and self.prev.steps[node.name]
  if not st then return false end
  if st.status == "ok" or st.status == "skipped" then
    self.status[node.name] = st.status
    self.reasons[node.name] = "done in an earlier attempt of this run"
    self.durations[node.name] = st.duration or 0
    self.attempts[node.name] = st.attempts
    if st.status == "ok" then
      self.done_order[#self.done_order + 1] = node
      if st.result ~= nil then self.ctx.results[node.name] = st.result end
    end
    self.progress:event { ev = "step_skip", step = node.name, status = st.status,
                          reason = "done before the resume" }
    return true
  end
  return false
end

-- Decide about the steps that were in flight when the previous attempt
-- stopped: run again only when that is safe or the operator says so.
-- Called before anything runs; returns nil and a message when it cannot
-- decide (no terminal and neither --rerun-unknown nor --skip-unknown).
function Run:decide_inflight()
  self.inflight_decision = {}
  if not self.prev then return true end
  for name in pairs(self.prev.inflight) do
    local node = self.book.byname[name]
    local d
    if not node then
      return nil, ("step '%s' of the journal is not in the playbook any more"):format(name)
    elseif node.idempotent then d = "run"
    elseif node.pg_tx then
      local db = type(node.pg_tx) == "function" and node.pg_tx(self.ctx) or node.pg_tx
      local ok, rows = rbe.try(db.query, db,
        "select 1 from rbe_steps where run_id = $1 and step = $2", self.run_id, name)
      if not ok and rows.code ~= "42P01" then return nil, tostring(rows) end
      d = (ok and #rows > 0) and "done" or "run"
    elseif node.check then
      local ok, v = rbe.try(rbe.timeout, node.timeout or "1m", node.check, self.ctx)
      if not ok then return nil, ("check of step '%s' failed: %s"):format(name, errtext(v)) end
      d = v and "done" or "run"
    elseif self.opts.rerun_unknown then d = "run"
    elseif self.opts.skip_unknown then d = "done"
    elseif rbe.isatty(0) and rbe.isatty(2) then
      local a = self.progress:ask(("step '%s' was running when the run stopped and may "
        .. "or may not have finished.\nRun it again? [y = run again / n = treat as done] ")
        :format(name))
      if a and a:lower():match("^%s*y") then d = "run"
      elseif a and a:lower():match("^%s*n") then d = "done"
      else return nil, "no decision for step '" .. name .. "'" end
    else
      return nil, ("step '%s' was in flight when the run stopped and is neither "
        .. "idempotent nor has a check: pass --rerun-unknown or --skip-unknown")
        :format(name)
    end
    self.inflight_decision[name] = d
  end
  return true
end

-- The ctx a step's functions see: its own step name, attempt and log, over
-- the run's shared ctx (vars, results, run_id, run_dir...), so parallel
-- steps never see each other's names.
function Run:step_ctx(name, attempt)
  local run = self
  local view = {
    step = name, attempt = attempt,
    log = function(fmt, ...)
      local msg = select("#", ...) > 0 and tostring(fmt):format(...) or tostring(fmt)
      run:emit { ev = "log", step = name, message = msg }
    end,
  }
  return setmetatable(view, { __index = self.ctx, __newindex = self.ctx })
end

function Run:call_step_fn(node, scope, attempt)
  local ctx = self:step_ctx(node.name, attempt)
  if node.pg_tx then
    local db = type(node.pg_tx) == "function" and node.pg_tx(ctx) or node.pg_tx
    return self:limited(node.timeout, scope, function()
      db:exec([[create table if not exists rbe_steps (
        run_id text not null, step text not null,
        finished_at timestamptz not null default now(),
        primary key (run_id, step))]])
      local result
      db:tx(function(tx)
        result = node.run(ctx, tx)
        tx:query("insert into rbe_steps (run_id, step) values ($1, $2)",
                 self.run_id, node.name)
      end)
      return result
    end)
  end
  return self:limited(node.timeout, scope, node.run, ctx)
end

function Run:exec_step(node, scope)
  local name = node.name
  local ctx = self:step_ctx(name, 0)
  if self:from_previous(node) then return end
  self.last_step = name
  self.index = self.index + 1
  local index = self.index
  local t0 = rbe.now()
  local function fail(err)
    self:record_end(node, "failed", t0, err)
    local policy = node.on_failure or self.book.root.on_failure or "undo"
    if policy == "continue" and not is_interrupt(err) then
      self.tolerated[#self.tolerated + 1] = name
      return
    end
    error(failure(node, err, policy), 0)
  end
  local ok, err = rbe.try(function()
    if node.when and not self:limited(node.timeout, scope, node.when, ctx) then
      return "when"
    end
    local decision = self.inflight_decision and self.inflight_decision[name]
    if decision == "done" then return "inflight-done" end
    if node.check and self:limited(node.timeout, scope, node.check, ctx) then
      return "check"
    end
  end)
  if not ok then
    self.attempts[name] = 0
    self:emit({ ev = "step_start", step = name, kind = "step", index = index }, true)
    if is_interrupt(err) then error(err, 0) end
    return fail(err)
  end
  if err == "when" then return self:skip(node, "condition false") end
  if err == "check" then return self:skip(node, "already done (check)") end
  if err == "inflight-done" then
    self.done_order[#self.done_order + 1] = node
    return self:skip(node, "finished before the crash", "ok")
  end
  if node.confirm then
    local yes, why = self:confirm(node, ("%s\nproceed with '%s'? [y/N] "):format(
      node.confirm, name))
    if not yes then
      self.attempts[name] = 0
      self:emit({ ev = "step_start", step = name, kind = "step", index = index }, true)
      return fail(rbe.error("confirm", "not confirmed: " .. tostring(why)))
    end
  end
  self.started[name] = true
  local retries = node.retries or 0
  local backoff = node.backoff and rbe.duration(node.backoff) or 1
  self:emit({ ev = "step_start", step = name, kind = "step", index = index }, true)
  for attempt = 1, retries + 1 do
    self.attempts[name] = attempt
    local res = table.pack(rbe.try(self.call_step_fn, self, node, scope, attempt))
    if res[1] then
      ctx.results[name] = res[2]
      self.done_order[#self.done_order + 1] = node
      self:record_end(node, "ok", t0, nil, { result = res[2] })
      return
    end
    err = res[2]
    if is_interrupt(err) then
      self:record_end(node, "interrupted", t0, err)
      error(err, 0)
    end
    local last = attempt > retries or err.kind == "budget" or err.kind == "cancelled"
    if last then return fail(err) end
    local wait = backoff * 2 ^ (attempt - 1)
    self:emit { ev = "step_attempt_failed", step = name, attempt = attempt,
                error = self.mask(errtext(err)), retry_in = wait }
    local slept = rbe.try(self.limited, self, nil, scope, rbe.sleep, wait)
    if not slept then return fail(err) end
  end
end

function Run:exec_gate(node, scope)
  local name = node.name
  local ctx = self:step_ctx(name, 0)
  if self:from_previous(node) then return end
  self.last_step = name
  self.index = self.index + 1
  local t0 = rbe.now()
  if node.when then
    local ok, v = rbe.try(node.when, ctx)
    if ok and not v then return self:skip(node, "condition false") end
  end
  local every = rbe.duration(node.every or "5s")
  local need = node.pass or 1
  local within = rbe.duration(node.within or "5m")
  local deadline = t0 + within
  if scope.deadline and scope.budget_mode ~= "warn" and scope.deadline < deadline then
    deadline = scope.deadline
  end
  self:emit({ ev = "step_start", step = name, kind = "gate", index = self.index }, true)
  local streak, polls, last_err = 0, 0, nil
  self.attempts[name] = 0
  while true do
    polls = polls + 1
    self.attempts[name] = polls
    ctx.attempt = polls
    local left = deadline - rbe.now()
    local ok, v = rbe.try(rbe.timeout, math.max(math.min(every, left), 0.001), node.check, ctx)
    if not ok and is_interrupt(v) then
      self:record_end(node, "interrupted", t0, v)
      error(v, 0)
    end
    local passed = ok and v ~= false and v ~= nil
    last_err = not ok and v or (not passed and "check returned " .. tostring(v)) or nil
    streak = passed and streak + 1 or 0
    self:emit { ev = "gate_poll", step = name, ok = passed, streak = streak,
                pass = need, poll = polls,
                error = last_err and self.mask(errtext(last_err)) or nil }
    if streak >= need then
      self.gates[name] = { passed = true, polls = polls, streak = streak, need = need,
                           duration = rbe.now() - t0 }
      self:record_end(node, "ok", t0, nil, { polls = polls })
      return
    end
    if rbe.now() + every > deadline then
      local e = rbe.error("gate", ("gate '%s' did not pass %d time(s) in a row within %s "
        .. "(%d polls; last: %s)"):format(name, need, progress.fmt_dur(deadline - t0),
        polls, last_err and errtext(last_err) or "passed"))
      self.gates[name] = { passed = false, polls = polls, streak = streak, need = need,
                           duration = rbe.now() - t0, error = e.message }
      self:record_end(node, "failed", t0, e, { polls = polls })
      local policy = self.book.root.on_failure or "undo"
      if policy == "continue" then self.tolerated[#self.tolerated + 1] = name return end
      error(failure(node, e, policy), 0)
    end
    local ok2, e2 = rbe.try(rbe.sleep, every)
    if not ok2 then
      self:record_end(node, "interrupted", t0, e2)
      error(e2, 0)
    end
  end
end

function Run:exec_manual(node, scope)
  if self:from_previous(node) then return end
  self.index = self.index + 1
  local t0 = rbe.now()
  if node.when then
    local ok, v = rbe.try(node.when, self:step_ctx(node.name, 0))
    if ok and not v then return self:skip(node, "condition false") end
  end
  self.last_step = node.name
  self:emit({ ev = "step_start", step = node.name, kind = "manual", index = self.index }, true)
  self.attempts[node.name] = 1
  local ok, yes, why = rbe.try(self.confirm, self, node,
    ("MANUAL STEP: %s\ntype 'done' when it is done (or 'abort'): "):format(node.text or node.name))
  if not ok then
    self:record_end(node, "interrupted", t0, yes)
    error(yes, 0)
  end
  if yes then
    self.manual_log[#self.manual_log + 1] = { step = node.name, by = self.user,
      at = os.date("!%Y-%m-%dT%H:%M:%SZ"), auto = self.opts.yes or false }
    self.done_order[#self.done_order + 1] = node
    self:record_end(node, "ok", t0, nil, { by = self.user, auto = self.opts.yes or false })
    return
  end
  local e = rbe.error("manual", ("manual step '%s' not done: %s"):format(node.name, tostring(why)))
  self:record_end(node, "failed", t0, e)
  error(failure(node, e, self.book.root.on_failure or "undo"), 0)
end

function Run:exec_parallel(node, scope)
  local children = node.children
  local limit = node.limit or #children
  local tasks, running, next_i = {}, {}, 1
  local first_failure
  local ok, err = pcall(function()
    while next_i <= #children or #running > 0 do
      while not first_failure and next_i <= #children and #running < limit do
        local child = children[next_i]
        local t = rbe.spawn(self.exec, self, child, scope)
        tasks[#tasks + 1] = t
        running[#running + 1] = t
        next_i = next_i + 1
      end
      if #running == 0 then break end
      local i = rbe.wait_any(running)
      local t = table.remove(running, i)
      local e = t:error()
      if e and not first_failure then
        first_failure = e
        for _, r in ipairs(running) do r:cancel() end
      end
    end
  end)
  if not ok then
    for _, t in ipairs(tasks) do t:cancel() end
    for _, t in ipairs(tasks) do
      if not t:done() then pcall(rbe.wait_any, { t }, true) end
      t:error()
    end
    error(err, 0)
  end
  -- siblings cancelled because of a failure are recorded as such
  for _, child in ipairs(children) do
    if child.name and self.started[child.name] and self.status[child.name] == "failed"
       and first_failure and getmetatable(first_failure) == FAILURE
       and first_failure.node ~= child then
      self.status[child.name] = "cancelled"
    end
  end
  if first_failure then error(first_failure, 0) end
end

function Run:exec_phase(node, scope)
  local sub = { deadline = scope.deadline, budget_mode = node.budget_mode or scope.budget_mode,
                label = scope.label, budget = scope.budget }
  local t0 = rbe.now()
  if node.budget then
    local b = rbe.duration(node.budget)
    local pstate = self.prev and self.prev.phases[node.name]
    local used = pstate and pstate.used or 0
    local d = t0 + b - used
    if not sub.deadline or d < sub.deadline or sub.budget_mode == "warn" then
      sub.deadline, sub.label, sub.budget = d, "phase '" .. node.name .. "'", b
    end
  end
  local rec = { name = node.name, budget = node.budget and rbe.duration(node.budget) }
  self.phases[#self.phases + 1] = rec
  self:emit({ ev = "phase_start", phase = node.name }, false)
  local ok, err = pcall(function()
    for _, c in ipairs(node.children) do self:exec(c, sub) end
  end)
  rec.duration = rbe.now() - t0
  self:emit({ ev = "phase_end", phase = node.name, duration = rec.duration,
              ok = ok }, false)
  if ok then self:hook_notify("progress", { phase = node.name }) end
  if not ok then error(err, 0) end
end

function Run:exec(node, scope)
  local k = node.kind
  if k == "step" then return self:exec_step(node, scope)
  elseif k == "gate" then return self:exec_gate(node, scope)
  elseif k == "manual" then return self:exec_manual(node, scope)
  elseif k == "parallel" then return self:exec_parallel(node, scope)
  elseif k == "phase" then return self:exec_phase(node, scope)
  elseif k == "playbook" then
    for _, c in ipairs(node.children) do self:exec(c, scope) end
  end
end

---------------------------------------------------------------------------
-- undo

-- Undo completed steps in reverse order of completion.  Returns true, or
-- false plus the step whose undo failed.
function Run:undo_all()
  for i = #self.done_order, 1, -1 do
    local node = self.done_order[i]
    local name = node.name
    if node.undo and self.status[name] == "ok" and not (self.prev and self.prev.undone[name]) then
      local uctx = self:step_ctx(name, 0)
      local t0 = rbe.now()
      self:emit({ ev = "undo_start", step = name }, true)
      local ok, err = rbe.try(function()
        local lim = node.undo_timeout or node.timeout
        if lim then return rbe.timeout(lim, node.undo, uctx) end
        return node.undo(uctx)
      end)
      local d = rbe.now() - t0
      if ok then
        self.status[name] = "undone"
        self.undo_log[#self.undo_log + 1] = { step = name, ok = true, duration = d }
        self:emit({ ev = "undo_end", step = name, status = "ok", duration = d }, true)
      else
        self.status[name] = "undo_failed"
        self.errors[name] = errtext(err)
        self.undo_log[#self.undo_log + 1] = { step = name, ok = false, duration = d,
                                              error = self.mask(errtext(err)) }
        self:emit({ ev = "undo_end", step = name, status = "failed", duration = d,
                    error = self.mask(errtext(err)) }, true)
        if is_interrupt(err) then return nil, node, err end
        return false, node, err
      end
    elseif self.prev and self.prev.undone[name] then
      self.status[name] = "undone"
    end
  end
  return true
end

---------------------------------------------------------------------------
-- the whole run

local function needs_operator(book, opts)
  if opts.yes then return nil end
  local names = {}
  for _, n in ipairs(book.order) do
    if n.kind == "manual" or n.confirm then names[#names + 1] = n.name end
  end
  if #names == 0 then return nil end
  if rbe.isatty(0) and rbe.isatty(2) then return nil end
  return names
end

function Run:lock()
  local who = self.who
  local abs = self.book.path:sub(1, 1) == "/" and self.book.path
              or ((who.cwd or ".") .. "/" .. self.book.path)
  local dir = self.state_dir .. "/locks"
  journal.ensure_dir(self.state_dir)
  journal.ensure_dir(dir)
  local info = require("cjson").encode {
    user = self.user, host = who.host, pid = who.pid, run_id = self.run_id,
    since = os.date("!%Y-%m-%dT%H:%M:%SZ"), playbook = abs }
  local lk, holder = rbe.lock(dir .. "/" .. rbe.sha256(abs):sub(1, 16) .. ".lock", info)
  if not lk then
    local ok, h = pcall(require("cjson").decode, holder or "")
    if ok and type(h) == "table" then
      return nil, ("playbook %s is being run by %s@%s (pid %s, run %s) since %s")
        :format(abs, tostring(h.user), tostring(h.host),
                tostring(math.tointeger(h.pid) or h.pid),
                tostring(h.run_id), tostring(h.since))
    end
    return nil, "playbook " .. abs .. " is locked by another run"
  end
  self.lockfile = lk
  return true
end

-- run:execute() -> exit code.  Lock, journal, run the tree, undo on
-- failure, report.
function Run:execute()
  local book, opts = self.book, self.opts
  local who_needs = needs_operator(book, opts)
  if who_needs then
    io.stderr:write(("rbe: this playbook has steps that need an operator (%s), "
      .. "but there is no terminal: run it on a terminal or pass --yes\n")
      :format(table.concat(who_needs, ", ")))
    return M.EXIT.usage
  end
  local resumed = self.prev ~= nil
  self.run_id = self.run_id or journal.new_id()
  self.ctx.run_id = self.run_id
  local ok_lock, why = self:lock()
  if not ok_lock then
    io.stderr:write("rbe: ", why, "\n")
    return M.EXIT.locked
  end
  local decided, dwhy = self:decide_inflight()
  if not decided then
    io.stderr:write("rbe: cannot resume: ", dwhy, "\n")
    self.lockfile:release()
    return M.EXIT.usage
  end
  local runs = self.state_dir .. "/runs"
  journal.ensure_dir(runs)
  self.run_dir = runs .. "/" .. self.run_id
  self.ctx.run_dir = self.run_dir
  self.journal = journal.open(self.run_dir, { mask = self.mask, fsync = opts.fsync })
  self.t0 = rbe.now()
  self.started_at = os.date("!%Y-%m-%dT%H:%M:%SZ")
  local prev_used = resumed and self.prev.used or 0
  self:emit({ ev = resumed and "resume" or "run_start", run_id = self.run_id,
    playbook = book.name, path = book.path, sha256 = book.sha256,
    user = self.user, login = self.who.user, host = self.who.host, pid = self.who.pid,
    reason = opts.reason, vars = pb.display_vars(book), budget = self.budget,
    total_steps = #book.order, resumed = resumed or nil, rbe = rbe.version }, true)
  self:hook_start()
  local ticker = self.progress:start()
  local root_scope = { label = "run", budget = self.budget,
                       budget_mode = book.root.budget_mode or "fail" }
  if self.budget then root_scope.deadline = self.t0 + self.budget - prev_used end
  self.root_scope = root_scope

  local status, code
  local ok, err = pcall(self.exec, self, book.root, root_scope)
  if ok then
    status, code = "done", M.EXIT.ok
  elseif is_interrupt(err) or (getmetatable(err) == FAILURE and is_interrupt(err.err)) then
    status, code = "interrupted", M.EXIT.interrupted
    self:emit({ ev = "interrupted", step = self.last_step }, true)
  elseif getmetatable(err) == FAILURE then
    self.failed_step = err.node.name
    self.failure = self.mask(errtext(err.err))
    if err.policy == "undo" then
      local uok, unode, uerr = self:undo_all()
      if uok then status, code = "failed, undone", M.EXIT.failed
      elseif uok == nil then
        status, code = "interrupted during undo", M.EXIT.interrupted
        self:emit({ ev = "interrupted", step = unode.name, during = "undo" }, true)
      else
        status, code = "undo failed", M.EXIT.undo_failed
        self.undo_failed = { step = unode.name, error = self.mask(errtext(uerr)) }
      end
    else
      status, code = "failed, stopped", M.EXIT.failed
    end
  else
    -- a bug in the playbook outside any step (or in rbe): no undo guess
    self.failure = self.mask(errtext(err))
    status, code = "error", M.EXIT.failed
    if rbe.is_error(err) and err.kind == "usage" then code = M.EXIT.usage end
    self:emit({ ev = "error", error = self.failure }, true)
  end
  if ticker then ticker:cancel() end
  self.progress:finish()
  self.status_text, self.exit_code = status, code
  self.duration = rbe.now() - self.t0 + prev_used
  self:emit({ ev = "run_end", status = status, exit_code = code,
              duration = self.duration }, true)
  local report = require "rbe.report"
  rbe.shield(function()
    local rok, rerr = pcall(report.write, self)
    if not rok then io.stderr:write("rbe: could not write the report: ", tostring(rerr), "\n") end
    if not opts.json then report.summary(self, io.stderr) end
  end)
  self:hook_notify(code == M.EXIT.ok and "done" or "failed")
  self.lockfile:release()
  return code
end

---------------------------------------------------------------------------
-- resume

-- Read a run's journal into what resume needs.
function M.previous(events)
  local prev = { steps = {}, inflight = {}, undone = {}, phases = {}, used = 0 }
  local first, last_ts
  for _, ev in ipairs(events) do
    last_ts = ev.ts or last_ts
    if ev.ev == "run_start" then first = ev; prev.start = ev end
    if ev.ev == "step_start" then prev.inflight[ev.step] = true end
    if ev.ev == "step_end" or ev.ev == "step_skip" then
      prev.inflight[ev.step] = nil
      prev.steps[ev.step] = { status = ev.status, result = ev.result,
                              duration = ev.duration, attempts = ev.attempts }
    end
    if ev.ev == "undo_end" and ev.status == "ok" then prev.undone[ev.step] = true end
    if ev.ev == "undo_start" then prev.undoing = true end
    if ev.ev == "run_end" then prev.ended = ev end
    if ev.ev == "resume" then prev.ended = nil end
  end
  if first and last_ts and first.ts then prev.used = math.max(0, last_ts - first.ts) end
  return prev
end

---------------------------------------------------------------------------
-- single steps (the REPL) and plan

local function single_run(book, name, opts)
  local node = book.byname[name]
  if not node then
    error(rbe.error("usage", ("no step named '%s' in %s"):format(name, book.path)), 0)
  end
  local run = M.new(book, opts)
  run.run_id = journal.new_id()
  run.ctx.run_id = run.run_id
  local runs = run.state_dir .. "/runs"
  journal.ensure_dir(run.state_dir)
  journal.ensure_dir(runs)
  run.run_dir = runs .. "/" .. run.run_id
  run.ctx.run_dir = run.run_dir
  run.journal = journal.open(run.run_dir, { mask = run.mask })
  run.root_scope = { label = "run" }
  return run, node
end

-- runner.run_one(book, name, opts) -> the step's result (raises on failure)
function M.run_one(book, name, opts)
  local run, node = single_run(book, name, opts)
  run:emit({ ev = "run_start", run_id = run.run_id, playbook = book.name, path = book.path,
             sha256 = book.sha256, user = run.user, host = run.who.host, pid = run.who.pid,
             reason = opts.reason, single_step = name, total_steps = 1 }, true)
  local ok, err = pcall(run.exec, run, node, run.root_scope)
  run:emit({ ev = "run_end", status = ok and "done" or "failed" }, true)
  if not ok then error(getmetatable(err) == FAILURE and err.err or err, 0) end
  return run.ctx.results[name]
end

-- runner.undo_one(book, name, opts) -> true (raises on failure)
function M.undo_one(book, name, opts)
  local run, node = single_run(book, name, opts)
  if not node.undo then
    error(rbe.error("usage", ("step '%s' has no undo"):format(name)), 0)
  end
  run:emit({ ev = "run_start", run_id = run.run_id, playbook = book.name,
             user = run.user, reason = opts.reason, single_undo = name }, true)
  run.done_order = { node }
  run.status[name] = "ok"
  local ok, unode, err = run:undo_all()
  run:emit({ ev = "run_end", status = ok and "done" or "failed" }, true)
  if not ok then error(err, 0) end
  return true
end

-- runner.plan(book, opts) -> tree of {node, depth, plan_text, plan_error}
function M.plan(book, opts)
  local ctx = { vars = book.vars, results = {}, playbook = book.name, dry = true,
                log = function() end, run_id = "plan" }
  local lines = {}
  local function visit(node, depth)
    local entry = { node = node, depth = depth }
    lines[#lines + 1] = entry
    if node.plan then
      ctx.step = node.name
      local ok, v = rbe.try(rbe.timeout, node.timeout or "30s", node.plan, ctx)
      if ok then entry.plan = v else entry.plan_error = errtext(v) end
    end
    for _, c in ipairs(node.children or {}) do visit(c, depth + 1) end
  end
  visit(book.root, 0)
  return lines
end

local function describe(node)
  local bits = {}
  if node.kind == "step" then
    bits[#bits + 1] = node.undo and "undo: yes" or "undo: no"
    if node.timeout then bits[#bits + 1] = "timeout " .. node.timeout end
    if node.retries then bits[#bits + 1] = "retries " .. node.retries end
    if node.idempotent then bits[#bits + 1] = "idempotent" end
    if node.confirm then bits[#bits + 1] = "asks to confirm" end
    if node.on_failure then bits[#bits + 1] = "on failure: " .. node.on_failure end
    if node.pg_tx then bits[#bits + 1] = "exactly-once (pg)" end
  elseif node.kind == "gate" then
    bits[#bits + 1] = ("every %s, %d in a row, within %s"):format(
      node.every or "5s", node.pass or 1, node.within or "5m")
  elseif node.kind == "manual" then
    bits[#bits + 1] = "operator confirms"
  elseif node.kind == "parallel" then
    bits[#bits + 1] = node.limit and ("limit " .. node.limit) or "no limit"
  elseif node.budget then
    bits[#bits + 1] = "budget " .. node.budget
  end
  if (node.kind == "phase" or node.kind == "playbook") and node.budget_mode then
    bits[#bits + 1] = "budget_mode " .. node.budget_mode
  end
  return table.concat(bits, ", ")
end
M.describe = describe

-- runner.plan_text(book) -> the plan as text
function M.plan_text(book, opts)
  local mask = make_mask(book)
  local out = {}
  local vars = pb.display_vars(book)
  local names = {}
  for k in pairs(vars) do names[#names + 1] = k end
  table.sort(names)
  local vtext = {}
  for _, k in ipairs(names) do vtext[#vtext + 1] = k .. "=" .. tostring(vars[k]) end
  for _, e in ipairs(M.plan(book, opts)) do
    local n = e.node
    local indent = ("  "):rep(e.depth)
    local label = n.kind == "parallel" and "parallel" or (n.kind .. " " .. (n.name or ""))
    local d = describe(n)
    out[#out + 1] = ("%s%s%s"):format(indent, label, d ~= "" and ("  [" .. d .. "]") or "")
    if n.kind == "playbook" and #vtext > 0 then
      out[#out + 1] = indent .. "  vars: " .. table.concat(vtext, ", ")
    end
    if e.plan ~= nil then
      local text = type(e.plan) == "table" and table.concat(e.plan, "\n") or tostring(e.plan)
      for l in text:gmatch("[^\n]+") do out[#out + 1] = indent .. "    -> " .. mask(l) end
    elseif e.plan_error then
      out[#out + 1] = indent .. "    plan failed: " .. mask(e.plan_error)
    end
  end
  return table.concat(out, "\n") .. "\n"
end

---------------------------------------------------------------------------
-- hooks for `rbe watch` and notifications (lua/rbe/watch.lua,
-- modules/notify.lua).  Kept apart from the runner proper:
--   opts.trigger       what fired the run (rbe watch): a `trigger` event
--                      right after run_start, and the report's "Trigger"
--   book.root.notify   function(kind, info), e.g. notify.on_run{...}:
--                      called with "started" (after run_start),
--                      "progress" (a phase ended well) and "done" /
--                      "failed" (after the report); it may wait (at most
--                      opts.notify_timeout, 60 s; the end even after
--                      Ctrl-C) and its failures are journaled (`notify`
--                      events), never failing the run.

function Run:hook_start()
  -- who and why, for steps that tell people (notify.step)
  self.ctx.user, self.ctx.reason = self.user, self.opts.reason and self.mask(self.opts.reason)
  if self.opts.trigger ~= nil then
    self.trigger = self.opts.trigger
    self:emit({ ev = "trigger", trigger = self.opts.trigger }, true)
  end
  self:hook_notify("started")
end

function Run:hook_info(kind, extra)
  local done = 0
  for _, node in ipairs(self.book.order) do
    local st = self.status[node.name]
    if st == "ok" or st == "skipped" then done = done + 1 end
  end
  local info = {
    kind = kind, playbook = self.book.name, path = self.book.path, run_id = self.run_id,
    reason = self.opts.reason and self.mask(self.opts.reason), user = self.user,
    host = self.who.host, budget = self.budget, steps_done = done,
    steps_total = #self.book.order, resumed = self.prev ~= nil or nil,
    elapsed = self.t0 and (rbe.now() - self.t0 + (self.prev and self.prev.used or 0)),
    trigger = self.trigger and journal.sanitize(self.trigger, self.mask) or nil,
    ctx = self.ctx,
    journal = function(fields)
      local ev = { ev = "notify" }
      for k, v in pairs(fields) do ev[k] = v end
      self:emit(ev, true)
    end,
  }
  if kind == "done" or kind == "failed" then
    info.result, info.exit_code = self.status_text, self.exit_code
    info.elapsed = self.duration or info.elapsed
    info.step = self.failed_step or (self.undo_failed and self.undo_failed.step)
    info.error = self.failure or (self.undo_failed and self.undo_failed.error)
    info.report = self.run_dir and (self.run_dir .. "/report.md") or nil
  end
  for k, v in pairs(extra or {}) do info[k] = v end
  return info
end

function Run:hook_notify(kind, extra)
  local fn = self.book.root.notify
  if fn == nil then return end
  local mt = getmetatable(fn)
  if type(fn) ~= "function" and not (type(mt) == "table" and mt.__call) then
    if not self.notify_warned then
      self.notify_warned = true
      self:emit { ev = "warn", message = "playbook field notify must be a function "
        .. "(such as notify.on_run{...} of modules/notify.lua); ignored" }
    end
    return
  end
  local info = self:hook_info(kind, extra)
  local function call()
    local ok, err = rbe.try(rbe.timeout, self.opts.notify_timeout or 60, fn, kind, info)
    if not ok then
      self:emit({ ev = "notify", kind = kind, ok = false, error = self.mask(errtext(err)) }, true)
    end
  end
  -- the end is told even after Ctrl-C; a cancel during the others is
  -- journaled here and stops the run at its next wait
  if kind == "done" or kind == "failed" then rbe.shield(call) else call() end
end

M.Run = Run
M.FAILURE = FAILURE
return M
