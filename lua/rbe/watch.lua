-- rbe.watch: `rbe watch FILE`, run a playbook when its trigger fires.
-- The playbook's `trigger` field names a check (function(ctx) -> fired,
-- evidence) that runs every `every`; after `times` firings in a row the
-- playbook runs, at most once per `cooldown` (kept in the state dir, so
-- a restarted watcher does not roll back again: no rollback loops).  The
-- evidence of the checks that fired goes to the runner (opts.trigger):
-- the journal's `trigger` event and the report's "Trigger" section.  One
-- watcher per playbook (a lock in <state-dir>/locks).  main(args) returns
-- the exit code.
local rbe = require "rbe"
local fs = require "rbe.fs"
local cjson = require "cjson"

local M = {}

local EXIT = require("rbe.pbload").EXIT

M.HELP = [[
usage: rbe watch FILE [options]

Evaluates the playbook's trigger every `every` and runs the playbook when
the check fired `times` times in a row, at most once per `cooldown`
(remembered in the state dir). See docs/playbooks.md, "Triggers".

options:
  --var NAME=VALUE     set a playbook var (repeatable); --var-file FILE
  --state-dir DIR      journals, locks and the cooldown record (default
                       $RBE_STATE_DIR or ./.rbe)
  --once               exit after the first run, with its exit code
  --max-checks N       exit 0 after N checks (when nothing ran)
  --dry-run            evaluate the trigger, print "would run", run nothing
  --reason TEXT        the run's reason (default: the trigger's evidence)
  --as NAME            who runs it (default: the login)
  --yes                confirm manual and confirm steps (journaled as auto)
  --json               JSON lines on stdout (watch events and the run's)
  -q, -v, --no-color, --no-fsync   as for rbe run

Exit codes: 0 stopped by --max-checks or --once after a run that succeeded,
the run's code with --once, 2 usage or playbook error, 75 another watcher
holds the playbook, 130 interrupted.
]]

---------------------------------------------------------------------------
-- arguments

local OPTIONS = { once = 1, dry_run = 1, yes = 1, json = 1, quiet = 1, verbose = 1,
                 no_color = 1, no_fsync = 1, help = 1, var = 1, var_file = 1,
                 state_dir = 1, reason = 1, as = 1, max_checks = 1 }

-- The options of rbe run, plus --once, --dry-run and --max-checks N.
local function parse(args)
  local o, err = require("rbe.pbcli").parse(args, OPTIONS)
  if not o then return nil, err end
  if o.max_checks then
    local n = math.tointeger(tonumber(o.max_checks))
    if not n or n < 1 then
      return nil, "--max-checks expects a positive integer, got '" .. o.max_checks .. "'"
    end
    o.max_checks = n
  end
  return o
end

---------------------------------------------------------------------------
-- the trigger table

local TRIGGER_FIELDS = { check = true, every = true, times = true, cooldown = true,
                         timeout = true, description = true }

-- edit distance, for "did you mean"
local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1,
                        prev[j - 1] + (a:sub(i, i) == b:sub(j, j) and 0 or 1))
    end
    prev = cur
  end
  return prev[#b]
end

-- Validate root.trigger; returns the normalised trigger or raises a
-- playbook error (file:line of the playbook).
function M.trigger_of(book)
  local pb = require "rbe.playbook"
  local root = book.root
  local t = root.trigger
  local where = root.where
  if t == nil then
    pb.perror(where, "playbook '%s' has no trigger: add trigger = { check = function(ctx) "
      .. "return fired, evidence end, every = \"30s\", times = 2, cooldown = \"30m\" } "
      .. "(docs/playbooks.md, Triggers)", root.name)
  end
  if type(t) ~= "table" then
    pb.perror(where, "trigger must be a table { check = ..., every = ..., ... }, got %s", type(t))
  end
  for k in pairs(t) do
    if not TRIGGER_FIELDS[k] then
      local best, bd = nil, 3
      for known in pairs(TRIGGER_FIELDS) do
        local d = distance(tostring(k), known)
        if d < bd then best, bd = known, d end
      end
      pb.perror(where, "trigger: unknown field '%s'%s", tostring(k),
        best and (" (did you mean '" .. best .. "'?)") or "")
    end
  end
  local mt = getmetatable(t.check)
  if type(t.check) ~= "function" and not (mt and mt.__call) then
    pb.perror(where, "trigger: check must be a function(ctx) -> fired, evidence")
  end
  local out = { check = t.check, description = t.description }
  for _, f in ipairs { { "every", "30s" }, { "cooldown", "30m" } } do
    local ok, v = pcall(rbe.duration, t[f[1]] == nil and f[2] or t[f[1]])
    if not ok then
      pb.perror(where, "trigger: field '%s': %s", f[1], tostring(v.message or v):gsub("^.-: ", ""))
    end
    out[f[1]] = v
  end
  if out.every <= 0 then pb.perror(where, "trigger: every must be positive") end
  out.times = t.times == nil and 1 or t.times
  if math.type(out.times) ~= "integer" or out.times < 1 then
    pb.perror(where, "trigger: times must be a positive integer, got %s", tostring(t.times))
  end
  if t.timeout ~= nil then
    local ok, v = pcall(rbe.duration, t.timeout)
    if not ok then pb.perror(where, "trigger: field 'timeout': bad duration") end
    out.timeout = v
  else
    out.timeout = math.max(out.every, 1)
  end
  if out.description ~= nil and type(out.description) ~= "string" then
    pb.perror(where, "trigger: description must be a string")
  end
  out.summary = ("every %s, %d in a row, cooldown %s"):format(
    require("rbe.progress").fmt_dur(out.every), out.times,
    require("rbe.progress").fmt_dur(out.cooldown))
  return out
end

---------------------------------------------------------------------------
-- the watcher

local Watch = {}
Watch.__index = Watch

local function iso(t)
  return os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(t or rbe.time()))
end

local function is_interrupt(err)
  return rbe.is_error(err) and err.kind == "cancelled"
     and (err.interrupted == true or rbe.interrupted())
end

local function reason_of(ev)
  if type(ev) == "table" then
    if ev.reason ~= nil then return tostring(ev.reason) end
    local ok, s = pcall(cjson.encode, require("rbe.journal").sanitize(ev))
    return ok and s or "(evidence)"
  end
  if ev == nil then return nil end
  return tostring(ev)
end

-- one line of watcher output: stderr (plain) or a JSON line on stdout
function Watch:say(ev, text)
  local important = ev.important
  ev.important = nil
  if self.o.json then
    ev.ts = rbe.time()
    local ok, line = pcall(cjson.encode, self.journal.sanitize(ev, self.mask))
    if ok then io.stdout:write(line, "\n") io.stdout:flush() end
  elseif not self.o.quiet or important then
    io.stderr:write(os.date("%H:%M:%S "), "watch: ", self.mask(text), "\n")
    io.stderr:flush()
  end
end

function Watch:read_state()
  local ok, text = pcall(fs.read, self.state_file)
  if not ok then return {} end
  local dok, st = pcall(cjson.decode, text)
  return dok and type(st) == "table" and st or {}
end

function Watch:write_state(st)
  self.journal.ensure_dir(self.state_dir .. "/watch")
  fs.write(self.state_file, cjson.encode(st) .. "\n", { mode = "0600" })
end

-- run the playbook once with the trigger's evidence; returns its exit code
function Watch:run(evidence, last_reason)
  local runner = require "rbe.runner"
  local o = self.o
  local reason = o.reason or ("rbe watch: trigger fired: " .. tostring(last_reason or "?"))
  local run = runner.new(self.book, {
    yes = o.yes, reason = reason, as = o.as, json = o.json, quiet = o.quiet,
    verbose = o.verbose, state_dir = o.state_dir, no_color = o.no_color,
    fsync = not o.no_fsync, trigger = evidence })
  run.run_id = self.journal.new_id()
  local st = self:read_state()
  st.last_fired, st.last_fired_at, st.last_run_id = rbe.time(), iso(), run.run_id
  st.playbook, st.path = self.book.name, self.abs
  st.last_exit_code = nil
  -- the cooldown starts before the run: a crash mid-run still counts
  self:write_state(st)
  self:say({ ev = "watch_run", run_id = run.run_id, important = true },
    ("trigger fired: running %s (run %s)"):format(self.book.name, run.run_id))
  local code = run:execute()
  st.last_exit_code = code
  self:write_state(st)
  self:say({ ev = "watch_run_end", run_id = run.run_id, exit_code = code, important = true },
    ("run %s ended with exit %d; next run not before %s"):format(run.run_id, code,
      iso(st.last_fired + self.trigger.cooldown)))
  return code
end

-- the loop; returns the exit code
function Watch:loop()
  local t, o = self.trigger, self.o
  local ctx = { vars = self.book.vars, playbook = self.book.name, state = {}, dry = false,
                watch = true }
  ctx.log = function(fmt, ...)
    local msg = select("#", ...) > 0 and tostring(fmt):format(...) or tostring(fmt)
    self:say({ ev = "watch_log", message = msg }, msg)
  end
  self:say({ ev = "watch_start", playbook = self.book.name, path = self.book.path,
             every = t.every, times = t.times, cooldown = t.cooldown, important = true },
    ("watching %s (%s)%s"):format(self.book.name, t.summary, o.dry_run and ", dry run" or ""))
  local streak, recent, checks = 0, {}, 0
  while true do
    checks = checks + 1
    ctx.check = checks
    local t0 = rbe.now()
    local ok, fired, ev = rbe.try(rbe.timeout, t.timeout, t.check, ctx)
    if not ok then
      if is_interrupt(fired) then return EXIT.interrupted end
      streak, recent = 0, {}
      self:say({ ev = "watch_check", check = checks, ok = false, error = tostring(fired) },
        ("check %d failed (counts as not fired): %s"):format(checks, tostring(fired)))
    else
      fired = fired and true or false
      local entry = { at = iso(), fired = fired, reason = reason_of(ev),
                      evidence = type(ev) == "table" and ev or nil }
      if fired then
        streak = streak + 1
        recent[#recent + 1] = entry
        while #recent > t.times do table.remove(recent, 1) end
      else
        streak, recent = 0, {}
      end
      self:say({ ev = "watch_check", check = checks, fired = fired, streak = streak,
                 times = t.times, reason = entry.reason },
        ("check %d: %s%s"):format(checks, fired and ("fired (" .. streak .. "/" .. t.times .. ")")
          or "quiet", entry.reason and (": " .. entry.reason) or ""))
      if streak >= t.times then
        local st = self:read_state()
        local now = rbe.time()
        if st.last_fired and now < st.last_fired + t.cooldown then
          self:say({ ev = "watch_cooldown", last_run_id = st.last_run_id,
                     until_ts = st.last_fired + t.cooldown, important = true },
            ("trigger fired, but run %s started at %s: in cooldown until %s, not running")
              :format(tostring(st.last_run_id), tostring(st.last_fired_at),
                      iso(st.last_fired + t.cooldown)))
        else
          local evidence = { fired_at = iso(now), description = t.description or t.summary,
                             reason = entry.reason, checks = recent }
          if o.dry_run then
            self:say({ ev = "watch_dry_run", evidence = evidence, important = true },
              "trigger fired: would run " .. self.book.name .. " (--dry-run)")
            if o.once then return EXIT.ok end
          else
            local code = self:run(evidence, entry.reason)
            if code == EXIT.interrupted or o.once then return code end
          end
        end
        streak, recent = 0, {}
      end
    end
    if o.max_checks and checks >= o.max_checks then
      self:say({ ev = "watch_stop", checks = checks, important = true },
        ("stopping after %d checks (--max-checks)"):format(checks))
      return EXIT.ok
    end
    local wait = t.every - (rbe.now() - t0)
    local sok, serr = rbe.try(rbe.sleep, wait > 0 and wait or 0)
    if not sok then
      if is_interrupt(serr) or (rbe.is_error(serr) and serr.kind == "cancelled") then
        return EXIT.interrupted
      end
      error(serr, 0)
    end
  end
end

local function usage_error(msg)
  io.stderr:write("rbe: ", msg, "\nRun 'rbe watch --help' for usage.\n")
  return EXIT.usage
end

-- rbe watch ARGS -> exit code
function M.main(args)
  local o, err = parse(args)
  if not o then return usage_error(err) end
  if o.help then io.write(M.HELP) return EXIT.ok end
  local path = o.pos[1]
  if not path then return usage_error("rbe watch: missing FILE") end
  if #o.pos > 1 then return usage_error("rbe watch: unexpected argument " .. o.pos[2]) end
  local journal = require "rbe.journal"
  local book, trigger
  local ok, lerr = rbe.try(function()
    local root, text = require("rbe.pbload").load_chunk(path)
    local pb = require "rbe.playbook"
    if not pb.is_playbook(root) then
      pb.perror(nil, "%s does not return a playbook (pb.playbook \"name\" { ... })", path)
    end
    book = pb.from_root(root, path, text, { vars = o.vars, var_files = o.var_files })
    trigger = M.trigger_of(book)
  end)
  if not ok then
    if lerr.kind == "playbook" or lerr.kind == "usage" then
      io.stderr:write("rbe: ", tostring(lerr.message), "\n")
      return EXIT.usage
    end
    error(lerr, 0)
  end
  -- steps that need an operator: refuse now, not when the trigger fires
  if not o.yes and not o.dry_run and not (rbe.isatty(0) and rbe.isatty(2)) then
    local names = {}
    for _, n in ipairs(book.order) do
      if n.kind == "manual" or n.confirm then names[#names + 1] = n.name end
    end
    if #names > 0 then
      io.stderr:write(("rbe: this playbook has steps that need an operator (%s), but there "
        .. "is no terminal: pass --yes to let the watcher confirm them\n")
        :format(table.concat(names, ", ")))
      return EXIT.usage
    end
  end
  local who = rbe.whoami()
  local abs = path:sub(1, 1) == "/" and path or ((who.cwd or ".") .. "/" .. path)
  local state_dir = journal.state_dir(o.state_dir)
  local key = rbe.sha256(abs):sub(1, 16)
  journal.ensure_dir(state_dir)
  journal.ensure_dir(state_dir .. "/locks")
  local lk, holder = rbe.lock(state_dir .. "/locks/watch-" .. key .. ".lock", cjson.encode {
    user = who.user, host = who.host, pid = who.pid, since = iso(), playbook = abs })
  if not lk then
    local hok, h = pcall(cjson.decode, holder or "")
    io.stderr:write("rbe: ", hok and type(h) == "table"
      and ("%s is already watched by %s@%s (pid %s) since %s"):format(abs, tostring(h.user),
        tostring(h.host), tostring(math.tointeger(h.pid) or h.pid), tostring(h.since))
      or (abs .. " is already watched by another rbe watch"), "\n")
    return EXIT.locked
  end
  local w = setmetatable({ o = o, book = book, trigger = trigger, journal = journal,
    state_dir = state_dir, abs = abs, mask = require("rbe.runner").make_mask(book),
    state_file = state_dir .. "/watch/" .. key .. ".json" }, Watch)
  local lok, code = rbe.try(w.loop, w)
  lk:release()
  if not lok then
    if is_interrupt(code) then return EXIT.interrupted end
    error(code, 0)
  end
  return code
end

return M
