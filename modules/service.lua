-- service: the processes around the app.  git (current revision, checkout
-- of a tag or commit with local changes stashed first and the previous
-- revision recorded for undo), builds (commands with timeouts, output
-- saved to a log in the run directory), pm2 (jlist, restart, stop,
-- start), systemd (systemctl) and Docker (ps, stop, start, run).  Every
-- tool runs through rbe.proc with an argv (no shell); a missing tool or
-- an absent systemd / Docker engine is a clear `service` error.  The
-- *_step builders return pb.step specs with run, undo and plan; their
-- fields may be functions of ctx.
--
--   service.git{dir}      -> g: g:head(), g:rev(ref), g:changes(),
--                            g:stash(msg), g:checkout(ref), g:restore(rec)
--   service.build{dir, cmd | cmds, timeout, log}          -> info [yields]
--   service.pm2{pm2, home} -> p: p:list(), p:status(name), p:restart(name), ...
--   service.systemd{}      -> s: s:status(unit), s:restart(unit), ...
--   service.docker{}       -> d: d:ps(), d:stop(name), d:start(name), d:run{...}
--
-- See docs/modules/service.md.
local rbe = require "rbe"
local kit = require "rbe.stepkit"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local json = require "rbe.json"

local type, pairs, ipairs, error, tostring, tonumber, setmetatable, pcall =
  type, pairs, ipairs, error, tostring, tonumber, setmetatable, pcall
local format, concat = string.format, table.concat

local M = {}

---------------------------------------------------------------------------
-- helpers

local function check_fields(t, known, fname, level)
  for k in pairs(t) do
    if not known[k] then
      error(format("%s: unknown option '%s'", fname, tostring(k)), level or 3)
    end
  end
end

local resolve = kit.resolve

local service_error = kit.error_for("service")
local function serr(code, fmt, ...) return service_error(code, format(fmt, ...)) end

local function task_error(err)
  return rbe.is_error(err) and (err.kind == "cancelled"
    or (err.kind == "timeout" and err.code == "ETIMEDOUT" and not err.command))
end

-- argv prefix of a tool: "git", "/usr/bin/git" or {"node", "/x/pm2"}
local function tool_argv(v, default)
  v = v or default
  if type(v) == "string" then return { v } end
  if type(v) == "table" and #v > 0 then
    local out = {}
    for i, x in ipairs(v) do out[i] = x end
    return out
  end
  error("service: a tool must be a path or an argv list, got " .. type(v), 3)
end

local function argv_of(prefix, ...)
  local a = {}
  for i, x in ipairs(prefix) do a[i] = x end
  for i = 1, select("#", ...) do a[#a + 1] = select(i, ...) end
  return a
end

local function last_lines(s, n)
  local lines = {}
  for l in tostring(s or ""):gmatch("[^\n]+") do lines[#lines + 1] = l end
  local from = math.max(1, #lines - (n or 5) + 1)
  return concat(lines, "\n", from, #lines)
end

local function slug(s)
  return (tostring(s):lower():gsub("[^%w]+", "-"):gsub("^%-+", ""):gsub("%-+$", ""))
end

local STEP_FIELDS = { timeout = true, undo_timeout = true, retries = true, backoff = true,
  confirm = true, on_failure = true, description = true, when = true }

local function step_base(o, known, fname)
  return kit.base_spec(o, known, fname, STEP_FIELDS)
end

local function resolved(o, ctx, keys)
  local out = {}
  for _, k in ipairs(keys) do out[k] = resolve(o[k], ctx) end
  return out
end

---------------------------------------------------------------------------
-- git

local Git = {}
Git.__index = Git
Git.__name = "service.git"

-- service.git{dir, git = "git", timeout = "2m", env} -> g
function M.git(o)
  if type(o) ~= "table" then error("service.git: options table expected", 2) end
  check_fields(o, { dir = true, git = true, timeout = true, env = true }, "service.git")
  if type(o.dir) ~= "string" or o.dir == "" then
    error("service.git: dir (the repository) expected", 2)
  end
  return setmetatable({ dir = o.dir, _git = tool_argv(o.git, "git"),
    timeout = o.timeout or "2m", env = o.env }, Git)
end

Git.__tostring = function(g) return "git repository " .. g.dir end

-- run git; raises a `service` error naming the command and git's message
function Git:_run(args, o)
  o = o or {}
  local argv = argv_of(self._git, "-C", self.dir, table.unpack(args))
  local env = { GIT_TERMINAL_PROMPT = "0" }
  for k, v in pairs(self.env or {}) do env[k] = v end
  local ok, r = rbe.try(proc.run, argv, { env = env, timeout = self.timeout,
    check = false, stdin = o.stdin })
  if not ok then
    if task_error(r) then error(r, 0) end
    if r.code == "ENOENT" then
      error(serr("ENOENT", "git: %s not found: is git installed?", self._git[1]), 0)
    end
    error(serr(r.code, "git %s in %s: %s", args[1], self.dir, tostring(r.message)), 0)
  end
  if r.code ~= 0 and not o.check_false then
    local msg = last_lines(r.stderr ~= "" and r.stderr or r.stdout, 4)
    local e = serr(r.code, "git %s in %s failed (exit %d): %s", concat(args, " "), self.dir,
      r.code, msg)
    e.stderr = r.stderr
    error(e, 0)
  end
  return r
end

-- g:rev([ref]) -> the full commit id of ref (default HEAD)
function Git:rev(ref)
  ref = ref or "HEAD"
  local r = self:_run({ "rev-parse", "--verify", "--quiet", ref .. "^{commit}" },
    { check_false = true })
  local sha = r.stdout:gsub("%s+$", "")
  if r.code ~= 0 or sha == "" then
    error(serr("ENOENT", "git: %s is not a commit in %s", ref, self.dir), 0)
  end
  return sha
end

-- g:head() -> {sha, branch (nil when detached), tag (an exact tag or nil)}
function Git:head()
  local sha = self:rev("HEAD")
  local b = self:_run({ "symbolic-ref", "-q", "--short", "HEAD" }, { check_false = true })
  local t = self:_run({ "describe", "--tags", "--exact-match", "HEAD" }, { check_false = true })
  return { sha = sha, branch = b.code == 0 and (b.stdout:gsub("%s+$", "")) or nil,
           tag = t.code == 0 and (t.stdout:gsub("%s+$", "")) or nil }
end

-- g:changes() -> list of `git status --porcelain` lines (ignored files
-- excluded); empty when the tree is clean
function Git:changes()
  local out = {}
  for l in self:_run({ "status", "--porcelain" }).stdout:gmatch("[^\n]+") do
    out[#out + 1] = l
  end
  return out
end

-- identity for the stash commit when the repository has none configured
function Git:_identity()
  local r = self:_run({ "config", "--get", "user.email" }, { check_false = true })
  if r.code == 0 and r.stdout:match("%S") then return {} end
  return { "-c", "user.name=rbe", "-c", "user.email=rbe@" .. (rbe.whoami().host or "localhost") }
end

-- g:stash(message) -> the stash commit id, or nil when there was nothing
-- to stash (untracked files included, ignored files not)
function Git:stash(message)
  if #self:changes() == 0 then return nil end
  local args = self:_identity()
  for _, a in ipairs { "stash", "push", "--include-untracked", "-m",
                       message or "rbe: local changes before a checkout" } do
    args[#args + 1] = a
  end
  self:_run(args)
  return self:rev("stash@{0}")
end

-- g:checkout(ref, {stash = true, message}) -> record {dir, ref, sha,
-- previous, previous_branch, stash}: local changes are stashed first
-- (stash = false: a dirty tree is refused); the record is what
-- g:restore() needs
function Git:checkout(ref, o)
  o = o or {}
  if type(ref) ~= "string" or ref == "" then
    error("service.git:checkout: ref (tag, branch or commit) expected", 2)
  end
  local target = self:rev(ref)
  local head = self:head()
  local rec = { dir = self.dir, ref = ref, sha = target, previous = head.sha,
                previous_branch = head.branch, previous_tag = head.tag }
  local changes = self:changes()
  if #changes > 0 then
    if o.stash == false then
      error(serr("EDIRTY", "git: %s has %d local change(s) (%s...): commit or stash them, "
        .. "or allow stash", self.dir, #changes, changes[1]), 0)
    end
    rec.stash = self:stash(o.message or ("rbe: local changes before checkout of " .. ref))
    rec.stashed = #changes
  end
  self:_run({ "checkout", "--quiet", "--detach", target })
  return rec
end

-- g:restore(rec) -> the revision checked out again: the branch (or
-- commit) of before the checkout, then the stashed changes re-applied and
-- their stash entry dropped
function Git:restore(rec)
  if type(rec) ~= "table" or not rec.previous then
    error("service.git:restore: a record of g:checkout expected", 2)
  end
  local changes = self:changes()
  if #changes > 0 then
    error(serr("EDIRTY", "git: %s has %d local change(s) since the checkout (%s...): "
      .. "refusing to restore over them", self.dir, #changes, changes[1]), 0)
  end
  local bok, bsha = false, nil
  if rec.previous_branch then bok, bsha = rbe.try(self.rev, self, rec.previous_branch) end
  if bok and bsha == rec.previous then
    self:_run({ "checkout", "--quiet", rec.previous_branch })
  else
    self:_run({ "checkout", "--quiet", "--detach", rec.previous })
  end
  if rec.stash then
    self:_run({ "stash", "apply", "--quiet", rec.stash })
    local list = self:_run({ "stash", "list", "--format=%H" }).stdout
    local i = 0
    for sha in list:gmatch("[^\n]+") do
      if sha == rec.stash then
        self:_run({ "stash", "drop", "--quiet", "stash@{" .. i .. "}" })
        break
      end
      i = i + 1
    end
  end
  return rec.previous
end

local GIT_STEP = { dir = true, ref = true, stash = true, git = true, git_timeout = true,
  env = true }

-- service.git_checkout_step{dir, ref, stash = true, git, env} -> a pb.step
-- spec; undo checks the previous revision out again (and re-applies the
-- stash)
function M.git_checkout_step(o)
  local spec = step_base(o, GIT_STEP, "service.git_checkout_step")
  if o.dir == nil or o.ref == nil then error("service.git_checkout_step: dir and ref are required", 2) end
  local function repo(ctx)
    return M.git { dir = resolve(o.dir, ctx), git = resolve(o.git, ctx),
      timeout = o.git_timeout, env = resolve(o.env, ctx) }
  end
  spec.run = function(ctx)
    local g = repo(ctx)
    local ref = resolve(o.ref, ctx)
    local rec = g:checkout(ref, { stash = o.stash,
      message = "rbe run " .. tostring(ctx.run_id) .. ": local changes before checkout of " .. ref })
    ctx.log("git: %s now at %s (%s), was %s%s", rec.dir, ref, rec.sha:sub(1, 12),
      rec.previous_branch or rec.previous:sub(1, 12),
      rec.stash and (", " .. rec.stashed .. " local change(s) stashed as " .. rec.stash:sub(1, 12)) or "")
    return rec
  end
  spec.undo = function(ctx)
    local rec = ctx.results[ctx.step]
    if type(rec) ~= "table" then return end
    repo(ctx):restore(rec)
    ctx.log("git: %s back at %s", rec.dir, rec.previous_branch or rec.previous:sub(1, 12))
  end
  spec.plan = function(ctx)
    local g = repo(ctx)
    local ref = resolve(o.ref, ctx)
    local target = g:rev(ref)
    local head = g:head()
    local n = #g:changes()
    local out = { format("would check out %s (%s) in %s, now at %s (%s)", ref, target:sub(1, 12),
      g.dir, head.branch or head.tag or "detached", head.sha:sub(1, 12)) }
    if n > 0 then
      out[2] = o.stash == false and format("refuses: %d local change(s)", n)
        or format("would stash %d local change(s) first", n)
    end
    return out
  end
  return spec
end

---------------------------------------------------------------------------
-- builds

local BUILD_OPTS = { dir = true, cmd = true, cmds = true, env = true, timeout = true,
  log = true }

local function commands_of(o, fname)
  local list = o.cmds or (o.cmd and { o.cmd })
  if type(list) ~= "table" or #list == 0 then
    error(fname .. ": cmd (an argv list such as {\"npm\", \"ci\"}) or cmds expected", 3)
  end
  for i, c in ipairs(list) do
    if type(c) ~= "table" or type(c[1]) ~= "string" then
      error(format("%s: command %d must be an argv list", fname, i), 3)
    end
  end
  return list
end

local function show_cmd(argv)
  local parts = {}
  for i, a in ipairs(argv) do parts[i] = rbe.is_secret(a) and "***" or tostring(a) end
  return concat(parts, " ")
end

-- service.build{dir, cmd = {"npm", "ci"} | cmds = {{...}, ...}, env,
-- timeout = "10m" (each command), log = path} -> {log, elapsed, commands}.
-- stdout and stderr of every command go to `log` as they come (each
-- command under a "$ cmd" line); a failure raises a `service` error with
-- the log's path and last lines.
function M.build(o)
  if type(o) ~= "table" then error("service.build: options table expected", 2) end
  check_fields(o, BUILD_OPTS, "service.build")
  if type(o.dir) ~= "string" then error("service.build: dir expected", 2) end
  local cmds = commands_of(o, "service.build")
  local log = o.log
  if log == nil then
    log = fs.tmpdir("rbe-build-") .. "/build.log"
  end
  local limit = rbe.duration(o.timeout or "10m")
  local t_all = rbe.now()
  for _, argv in ipairs(cmds) do
    fs.append(log, format("$ %s    # in %s, %s\n", show_cmd(argv), o.dir, os.date("!%Y-%m-%dT%H:%M:%SZ")),
      { mode = "0600" })
    local t0 = rbe.now()
    local tail = {}
    local ok, r = rbe.try(function()
      local child <close> = proc.spawn(argv, { cwd = o.dir, env = o.env, stderr = "stdout",
        timeout = limit })
      for line in child:lines() do
        fs.append(log, line .. "\n")
        tail[#tail + 1] = line
        if #tail > 10 then table.remove(tail, 1) end
      end
      return child:wait()
    end)
    local elapsed = rbe.now() - t0
    if not ok then
      local err = r
      if task_error(err) then error(err, 0) end
      if err.code == "ENOENT" then
        error(serr("ENOENT", "build: %s not found (in %s)", tostring(argv[1]), o.dir), 0)
      end
      local code = err.kind == "timeout" and "ETIMEDOUT" or err.code
      local what = err.kind == "timeout" and format("timed out after %gs", limit)
        or format("exited %s", tostring(err.code))
      fs.append(log, format("# %s\n", what))
      local e = serr(code, "build: `%s` %s in %s (log: %s)%s", show_cmd(argv), what, o.dir, log,
        #tail > 0 and (":\n" .. concat(tail, "\n")) or "")
      e.log = log
      error(e, 0)
    end
    fs.append(log, format("# exit 0 after %.1fs\n", elapsed))
  end
  return { log = log, elapsed = rbe.now() - t_all, commands = #cmds }
end

-- service.build_step{dir, cmd | cmds, env, build_timeout, log} -> a pb.step
-- spec; the log goes to <run dir>/build-<step>.log unless `log` names one
function M.build_step(o)
  local known = { build_timeout = true }
  for k in pairs(BUILD_OPTS) do if k ~= "timeout" then known[k] = true end end
  local spec = step_base(o, known, "service.build_step")
  spec.run = function(ctx)
    local cmds = resolve(o.cmds, ctx) or { resolve(o.cmd, ctx) }
    local log = resolve(o.log, ctx) or ((ctx.run_dir or fs.tmpdir("rbe-build-"))
      .. "/build-" .. slug(ctx.step or "build") .. ".log")
    local r = M.build { dir = resolve(o.dir, ctx), cmds = cmds, env = resolve(o.env, ctx),
      timeout = o.build_timeout, log = log }
    ctx.log("build: %d command(s) in %.1fs, log %s", r.commands, r.elapsed, r.log)
    return r
  end
  spec.plan = function(ctx)
    local cmds = resolve(o.cmds, ctx) or { resolve(o.cmd, ctx) }
    local out = {}
    for i, c in ipairs(cmds) do
      out[i] = format("would run `%s` in %s", show_cmd(c), tostring(resolve(o.dir, ctx)))
    end
    return out
  end
  return spec
end

---------------------------------------------------------------------------
-- pm2

local PM2 = {}
PM2.__index = PM2
PM2.__name = "service.pm2"

-- service.pm2{pm2 = "pm2" | {"node", "/path/pm2"}, home = PM2_HOME, env,
-- timeout = "60s"} -> p.  PM2_DISABLE_VERSION_CHECK is set: pm2 never
-- calls the network in the middle of an incident.
function M.pm2(o)
  o = o or {}
  check_fields(o, { pm2 = true, home = true, env = true, timeout = true }, "service.pm2")
  local env = { PM2_DISABLE_VERSION_CHECK = "true" }
  for k, v in pairs(o.env or {}) do env[k] = v end
  if o.home then env.PM2_HOME = o.home end
  return setmetatable({ _pm2 = tool_argv(o.pm2, "pm2"), env = env,
    timeout = o.timeout or "60s" }, PM2)
end

function PM2:_run(...)
  local argv = argv_of(self._pm2, ...)
  local ok, r = rbe.try(proc.run, argv, { env = self.env, timeout = self.timeout, check = false })
  if not ok then
    if task_error(r) then error(r, 0) end
    if r.code == "ENOENT" then
      error(serr("ENOENT", "pm2: %s not found: is pm2 installed (npm install -g pm2)?",
        self._pm2[1]), 0)
    end
    error(serr(r.code, "pm2 %s: %s", (...), tostring(r.message)), 0)
  end
  if r.code ~= 0 then
    error(serr(r.code, "pm2 %s failed (exit %d): %s", concat({ ... }, " "), r.code,
      last_lines(r.stderr ~= "" and r.stderr or r.stdout, 4)), 0)
  end
  return r
end

-- the fields of a jlist entry we expose (pm2_env also holds the app's
-- environment: secrets, never copied)
local function pm2_entry(p)
  local env = type(p.pm2_env) == "table" and p.pm2_env or {}
  local monit = type(p.monit) == "table" and p.monit or {}
  local up = tonumber(env.pm_uptime)
  return {
    name = p.name, pm_id = p.pm_id, pid = tonumber(p.pid) or 0,
    status = env.status, restarts = tonumber(env.restart_time) or 0,
    unstable_restarts = tonumber(env.unstable_restarts) or 0,
    uptime = (up and env.status == "online") and math.max(0, rbe.time() - up / 1000) or 0,
    memory = tonumber(monit.memory), cpu = tonumber(monit.cpu),
    exec_mode = env.exec_mode, version = env.version ~= json.null and env.version or nil,
    cwd = env.pm_cwd,
  }
end

-- p:list() -> processes from `pm2 jlist`: {name, pm_id, pid, status,
-- restarts, uptime, memory, cpu, ...}
function PM2:list()
  local out = self:_run("jlist").stdout
  -- pm2 may print a banner or notices first: the list is the line that
  -- holds a JSON array
  local list
  for line in out:gmatch("[^\n]+") do
    if line:match("^%s*%[") then
      local ok, v = pcall(json.decode, line)
      if ok and type(v) == "table" then list = v end
    end
  end
  if not list then
    error(serr("EBADMSG", "pm2 jlist: no JSON list in its output: %s",
      last_lines(out, 2):sub(1, 200)), 0)
  end
  local res = {}
  for i, p in ipairs(list) do res[i] = pm2_entry(p) end
  return res
end

-- p:status(name) -> the process entry, or nil when pm2 has no such name
function PM2:status(name)
  for _, p in ipairs(self:list()) do
    if p.name == name or tostring(p.pm_id) == tostring(name) then return p end
  end
  return nil
end

-- wait until `name` is online (and, given, with a pid other than `old`)
function PM2:wait_online(name, o)
  o = o or {}
  local deadline = rbe.now() + rbe.duration(o.wait or "30s")
  local last
  while true do
    last = self:status(name)
    if last and last.status == "online" and last.pid > 0
       and (o.old_pid == nil or last.pid ~= o.old_pid) then
      return last
    end
    if rbe.now() > deadline then
      error(serr("ETIMEDOUT", "pm2: %s is not online after %s (status %s, pid %s)", name,
        tostring(o.wait or "30s"), last and tostring(last.status) or "unknown",
        last and tostring(last.pid) or "-"), 0)
    end
    rbe.sleep(o.poll or 0.2)
  end
end

local function need(p, name, what)
  local st = p:status(name)
  if not st then
    error(serr("ENOENT", "pm2: no process named %s (cannot %s it)", tostring(name), what), 0)
  end
  return st
end

-- The pid pm2 recorded for a single-instance process `name` in
-- <PM2_HOME>/pids/<name>-<pm_id>.pid, read without starting pm2's CLI (a
-- Node start-up, ~150 ms); nil when there is no such single file.
function PM2:_recorded_pid(name)
  local home = self.env.PM2_HOME or os.getenv("PM2_HOME")
    or (os.getenv("HOME") and os.getenv("HOME") .. "/.pm2")
  if not home or type(name) ~= "string" then return nil end
  local ok, files = pcall(fs.list, home .. "/pids")
  if not ok then return nil end
  local pattern = "^" .. name:gsub("%p", "%%%0") .. "%-%d+%.pid$"
  local found
  for _, f in ipairs(files) do
    if f:match(pattern) then
      if found then return nil end          -- several instances: ask pm2
      found = f
    end
  end
  local text = found and fs.read(home .. "/pids/" .. found) or ""
  local pid = tonumber(text:match("^%s*(%d+)%s*$"))
  return pid and pid > 0 and pid or nil
end

-- Restart through modules/service/pm2-restart.js: pm2's programmatic API,
-- restart and describe in one Node start-up.  -> entries (jlist shape), or
-- false when pm2 has no such process, or nil when the helper cannot be used
-- (pm2 given through a wrapper, no pm2 package, no node): then the CLI.
local PM2_HELPER = (package.rbe_root or ".") .. "/modules/service/pm2-restart.js"

function PM2:_helper_restart(name, o)
  local tool = self._pm2
  local node = #tool == 1 and "node"
    or (#tool == 2 and tool[1]:match("[^/]*$"):match("^node") and tool[1])
  if self._no_helper or not node or type(name) ~= "string" or not fs.exists(PM2_HELPER) then
    return nil
  end
  local ok, r = rbe.try(proc.run, { node, PM2_HELPER, tool[#tool], name,
    o.update_env and "--update-env" or nil }, { env = self.env, timeout = self.timeout, check = false })
  if not ok then
    if task_error(r) then error(r, 0) end
    self._no_helper = true
    return nil
  end
  if r.code == 5 then self._no_helper = true return nil end
  if r.code == 4 then return false end
  if r.code ~= 0 then
    error(serr(r.code, "pm2 restart %s failed (exit %d): %s", name, r.code,
      last_lines(r.stderr ~= "" and r.stderr or r.stdout, 4)), 0)
  end
  local line
  for l in r.stdout:gmatch("[^\n]+") do if l:sub(1, 1) == "[" then line = l end end
  local okj, list = pcall(json.decode, line or "")
  if not okj or type(list) ~= "table" then
    error(serr("EBADMSG", "pm2 restart %s: no JSON list in the helper's output: %s", name,
      last_lines(r.stdout, 2)), 0)
  end
  return list
end

-- p:restart(name, {update_env, wait = "30s"}) -> entry once online with a
-- new pid.  The old pid comes from pm2's pid file when there is one (else
-- from `pm2 jlist`); a name pm2 does not know is an ENOENT error.
function PM2:restart(name, o)
  o = o or {}
  local old = self:_recorded_pid(name)
  if not old then
    local before = need(self, name, "restart")
    old = before.pid > 0 and before.pid or nil
  end
  local list = self:_helper_restart(name, o)
  if list == false then need(self, name, "restart") end
  if list == nil then
    local ok, err = rbe.try(self._run, self, "restart", name, o.update_env and "--update-env" or nil)
    if not ok then
      if not task_error(err) and not self:status(name) then need(self, name, "restart") end
      error(err, 0)
    end
  end
  local after
  for _, p in ipairs(list or {}) do
    local e = pm2_entry(p)
    if e.status == "online" and e.pid > 0 and e.pid ~= old then after = e break end
  end
  after = after or self:wait_online(name, { wait = o.wait, old_pid = old })
  after.pid_before = old or 0
  after.via = list and "api" or "cli"
  return after
end

-- p:reload(name) -> entry once online
function PM2:reload(name, o)
  o = o or {}
  local before = need(self, name, "reload")
  self:_run("reload", name)
  local after = self:wait_online(name, { wait = o.wait })
  after.pid_before = before.pid
  return after
end

-- p:stop(name) -> entry (status "stopped")
function PM2:stop(name)
  need(self, name, "stop")
  self:_run("stop", name)
  return self:status(name)
end

-- p:start(name_or_file, {wait}) -> entry once online: a known name is
-- started again; anything else is given to `pm2 start` (a script or an
-- ecosystem file)
function PM2:start(what, o)
  o = o or {}
  local known = self:status(what)
  self:_run("start", what)
  if known then return self:wait_online(what, { wait = o.wait }) end
  return self:list()
end

-- p:delete(name)
function PM2:delete(name)
  self:_run("delete", name)
  return true
end

local PM2_STEP = { name = true, pm2 = true, home = true, env = true, wait = true,
  update_env = true }

local function pm2_of(o, ctx)
  local c = resolved(o, ctx, { "pm2", "home", "env" })
  return M.pm2 { pm2 = c.pm2, home = c.home, env = c.env }
end

local function describe_pm2(st)
  if not st then return "not known to pm2" end
  return format("%s, pid %s, %d restarts", tostring(st.status), tostring(st.pid), st.restarts)
end

-- service.pm2_restart_step{name, pm2, home, env, wait, update_env} -> a
-- pb.step spec (no undo: a restart is its own remedy)
function M.pm2_restart_step(o)
  local spec = step_base(o, PM2_STEP, "service.pm2_restart_step")
  if o.name == nil then error("service.pm2_restart_step: name is required", 2) end
  spec.run = function(ctx)
    local p, name = pm2_of(o, ctx), resolve(o.name, ctx)
    local st = p:restart(name, { update_env = o.update_env, wait = o.wait })
    ctx.log("pm2: %s restarted (pid %s -> %s)", name, tostring(st.pid_before), tostring(st.pid))
    return { name = name, pid = st.pid, pid_before = st.pid_before, status = st.status,
             restarts = st.restarts }
  end
  spec.plan = function(ctx)
    local p, name = pm2_of(o, ctx), resolve(o.name, ctx)
    return format("would restart %s (now %s)", name, describe_pm2(p:status(name)))
  end
  return spec
end

-- service.pm2_stop_step{...} -> a pb.step spec; undo starts it again
function M.pm2_stop_step(o)
  local spec = step_base(o, PM2_STEP, "service.pm2_stop_step")
  if o.name == nil then error("service.pm2_stop_step: name is required", 2) end
  spec.run = function(ctx)
    local p, name = pm2_of(o, ctx), resolve(o.name, ctx)
    local st = p:stop(name)
    return { name = name, status = st and st.status }
  end
  spec.undo = function(ctx)
    local p, name = pm2_of(o, ctx), resolve(o.name, ctx)
    p:start(name, { wait = o.wait })
  end
  spec.plan = function(ctx)
    local p, name = pm2_of(o, ctx), resolve(o.name, ctx)
    return format("would stop %s (now %s); undo starts it", name, describe_pm2(p:status(name)))
  end
  return spec
end

-- service.pm2_start_step{...} -> a pb.step spec; undo stops it again
function M.pm2_start_step(o)
  local spec = step_base(o, PM2_STEP, "service.pm2_start_step")
  if o.name == nil then error("service.pm2_start_step: name is required", 2) end
  spec.run = function(ctx)
    local p, name = pm2_of(o, ctx), resolve(o.name, ctx)
    local st = p:start(name, { wait = o.wait })
    return { name = name, pid = st.pid, status = st.status }
  end
  spec.undo = function(ctx)
    local p, name = pm2_of(o, ctx), resolve(o.name, ctx)
    p:stop(name)
  end
  spec.plan = function(ctx)
    local p, name = pm2_of(o, ctx), resolve(o.name, ctx)
    return format("would start %s (now %s); undo stops it", name, describe_pm2(p:status(name)))
  end
  return spec
end

---------------------------------------------------------------------------
-- systemd

local Systemd = {}
Systemd.__index = Systemd
Systemd.__name = "service.systemd"

-- service.systemd{systemctl = "systemctl", user = false, timeout = "90s",
-- runtime_dir = "/run/systemd/system"} -> s
function M.systemd(o)
  o = o or {}
  check_fields(o, { systemctl = true, user = true, timeout = true, runtime_dir = true },
    "service.systemd")
  return setmetatable({ _ctl = tool_argv(o.systemctl, "systemctl"), user = o.user,
    timeout = o.timeout or "90s", runtime_dir = o.runtime_dir or "/run/systemd/system" },
    Systemd)
end

-- systemd runs when /run/systemd/system exists (what sd_booted() tests)
function Systemd:_booted(what)
  if not fs.exists(self.runtime_dir) then
    error(serr("ENOSYSTEMD", "systemd: this host is not running systemd (no %s): cannot %s; "
      .. "manage the service with its own tool (pm2, docker, an init script)",
      self.runtime_dir, what), 0)
  end
end

local NO_SYSTEMD = { "not been booted with systemd", "Failed to connect to bus",
  "System has not been booted", "Host is down" }

function Systemd:_run(what, ...)
  self:_booted(what)
  local args = { ... }
  if self.user then table.insert(args, 1, "--user") end
  local argv = argv_of(self._ctl, table.unpack(args))
  local ok, r = rbe.try(proc.run, argv, { timeout = self.timeout, check = false })
  if not ok then
    if task_error(r) then error(r, 0) end
    if r.code == "ENOENT" then
      error(serr("ENOENT", "systemd: %s not found: cannot %s (is this a systemd host?)",
        self._ctl[1], what), 0)
    end
    error(serr(r.code, "systemd: cannot %s: %s", what, tostring(r.message)), 0)
  end
  if r.code ~= 0 then
    local msg = last_lines(r.stderr ~= "" and r.stderr or r.stdout, 3)
    for _, s in ipairs(NO_SYSTEMD) do
      if msg:find(s, 1, true) then
        error(serr("ENOSYSTEMD", "systemd: cannot %s: systemd is not running here (%s)",
          what, (msg:gsub("\n", " "))), 0)
      end
    end
    local e = serr(r.code, "systemd: cannot %s: systemctl exited %d: %s", what, r.code, msg)
    e.stderr = r.stderr
    error(e, 0)
  end
  return r
end

-- s:status(unit) -> {unit, active, sub, load, pid, since}
function Systemd:status(unit)
  local r = self:_run("read the status of " .. unit, "show", "--no-pager",
    "--property=ActiveState,SubState,LoadState,MainPID,ActiveEnterTimestamp", unit)
  local p = {}
  for k, v in r.stdout:gmatch("([%w]+)=([^\n]*)") do p[k] = v end
  return { unit = unit, active = p.ActiveState, sub = p.SubState, load = p.LoadState,
           pid = tonumber(p.MainPID), since = p.ActiveEnterTimestamp }
end

for _, verb in ipairs { "restart", "stop", "start", "reload" } do
  -- s:restart(unit) / s:stop / s:start / s:reload -> the status after
  Systemd[verb] = function(self, unit)
    if type(unit) ~= "string" or unit == "" then
      error("service.systemd:" .. verb .. ": unit name expected", 2)
    end
    self:_run(verb .. " " .. unit, verb, unit)
    return self:status(unit)
  end
end

local SD_STEP = { unit = true, systemctl = true, user = true, runtime_dir = true }

local function sd_of(o, ctx)
  local c = resolved(o, ctx, { "systemctl", "user", "runtime_dir" })
  return M.systemd(c)
end

local function sd_step(verb, undo_verb, o, fname)
  local spec = step_base(o, SD_STEP, fname)
  if o.unit == nil then error(fname .. ": unit is required", 2) end
  spec.run = function(ctx)
    local s, unit = sd_of(o, ctx), resolve(o.unit, ctx)
    local st = s[verb](s, unit)
    ctx.log("systemd: %s %s: %s/%s", verb, unit, tostring(st.active), tostring(st.sub))
    return st
  end
  if undo_verb then
    spec.undo = function(ctx)
      local s, unit = sd_of(o, ctx), resolve(o.unit, ctx)
      s[undo_verb](s, unit)
    end
  end
  spec.plan = function(ctx)
    local s, unit = sd_of(o, ctx), resolve(o.unit, ctx)
    local st = s:status(unit)
    return format("would %s %s (now %s/%s)%s", verb, unit, tostring(st.active),
      tostring(st.sub), undo_verb and ("; undo: " .. undo_verb) or "")
  end
  return spec
end

-- service.systemd_restart_step{unit, systemctl, user} (no undo),
-- systemd_stop_step (undo: start), systemd_start_step (undo: stop)
function M.systemd_restart_step(o) return sd_step("restart", nil, o, "service.systemd_restart_step") end
function M.systemd_stop_step(o) return sd_step("stop", "start", o, "service.systemd_stop_step") end
function M.systemd_start_step(o) return sd_step("start", "stop", o, "service.systemd_start_step") end

---------------------------------------------------------------------------
-- docker

local Docker = {}
Docker.__index = Docker
Docker.__name = "service.docker"

-- service.docker{docker = "docker", host = DOCKER_HOST, timeout = "2m"} -> d
function M.docker(o)
  o = o or {}
  check_fields(o, { docker = true, host = true, timeout = true, env = true }, "service.docker")
  local env = {}
  for k, v in pairs(o.env or {}) do env[k] = v end
  if o.host then env.DOCKER_HOST = o.host end
  return setmetatable({ _docker = tool_argv(o.docker, "docker"), env = env,
    timeout = o.timeout or "2m" }, Docker)
end

local NO_ENGINE = { "Cannot connect to the Docker daemon", "error during connect",
  "permission denied while trying to connect", "Is the docker daemon running" }

function Docker:_run(what, ...)
  local argv = argv_of(self._docker, ...)
  local ok, r = rbe.try(proc.run, argv, { env = self.env, timeout = self.timeout, check = false })
  if not ok then
    if task_error(r) then error(r, 0) end
    if r.code == "ENOENT" then
      error(serr("ENOENT", "docker: the docker CLI (%s) was not found: cannot %s; is Docker "
        .. "installed on this host?", self._docker[1], what), 0)
    end
    error(serr(r.code, "docker: cannot %s: %s", what, tostring(r.message)), 0)
  end
  if r.code ~= 0 then
    local msg = last_lines(r.stderr ~= "" and r.stderr or r.stdout, 3)
    for _, s in ipairs(NO_ENGINE) do
      if msg:find(s, 1, true) then
        error(serr("ENODOCKER", "docker: cannot %s: the Docker engine is not reachable (%s); "
          .. "is it installed and running?", what, (msg:gsub("\n", " "))), 0)
      end
    end
    local e = serr(r.code, "docker: cannot %s: docker exited %d: %s", what, r.code, msg)
    e.stderr = r.stderr
    error(e, 0)
  end
  return r
end

local function json_lines(s)
  local out = {}
  for l in s:gmatch("[^\n]+") do
    local ok, v = pcall(json.decode, l)
    if ok and type(v) == "table" then out[#out + 1] = v end
  end
  return out
end

-- d:ps{all = false, filter = {name = "web"}} -> list of {id, name, image,
-- state, status}
function Docker:ps(o)
  o = o or {}
  local args = { "ps", "--no-trunc", "--format", "{{json .}}" }
  if o.all then args[#args + 1] = "--all" end
  for k, v in pairs(o.filter or {}) do
    args[#args + 1] = "--filter"
    args[#args + 1] = k .. "=" .. tostring(v)
  end
  local r = self:_run("list containers", table.unpack(args))
  local out = {}
  for i, c in ipairs(json_lines(r.stdout)) do
    out[i] = { id = c.ID, name = c.Names, image = c.Image, state = c.State, status = c.Status }
  end
  return out
end

-- d:inspect(name) -> {id, name, image, status, running, pid} or nil
function Docker:inspect(name)
  local ok, r = rbe.try(self._run, self, "inspect " .. name, "inspect", "--type", "container",
    "--format", "{{json .}}", name)
  if not ok then
    if r.kind == "service" and r.stderr and r.stderr:find("No such", 1, true) then return nil end
    error(r, 0)
  end
  local c = json_lines(r.stdout)[1] or {}
  local st = type(c.State) == "table" and c.State or {}
  return { id = c.Id, name = type(c.Name) == "string" and c.Name:gsub("^/", "") or name,
           image = type(c.Config) == "table" and c.Config.Image or c.Image,
           status = st.Status, running = st.Running, pid = st.Pid }
end

-- d:stop(name, {timeout = seconds}) / d:start(name) / d:restart(name) ->
-- the container after; d:rm(name, {force}) -> true
function Docker:stop(name, o)
  o = o or {}
  if o.timeout then self:_run("stop " .. name, "stop", "--time", tostring(o.timeout), name)
  else self:_run("stop " .. name, "stop", name) end
  return self:inspect(name)
end

function Docker:start(name)
  self:_run("start " .. name, "start", name)
  return self:inspect(name)
end

function Docker:restart(name)
  self:_run("restart " .. name, "restart", name)
  return self:inspect(name)
end

function Docker:rm(name, o)
  if o and o.force then self:_run("remove " .. name, "rm", "--force", name)
  else self:_run("remove " .. name, "rm", name) end
  return true
end

local RUN_OPTS = { image = true, name = true, env = true, ports = true, args = true,
  cmd = true, restart = true, network = true, volumes = true }

-- d:run{image, name, env = {K = v}, ports = {"8080:80"}, volumes, network,
-- restart, args = {extra docker run flags}, cmd = {argv}} -> container id
-- (detached)
function Docker:run(o)
  if type(o) ~= "table" or type(o.image) ~= "string" then
    error("service.docker:run: {image = ..., ...} expected", 2)
  end
  check_fields(o, RUN_OPTS, "service.docker:run")
  local args = { "run", "--detach" }
  if o.name then args[#args + 1] = "--name"; args[#args + 1] = o.name end
  for _, k in ipairs((function()
    local ks = {}
    for k in pairs(o.env or {}) do ks[#ks + 1] = k end
    table.sort(ks)
    return ks
  end)()) do
    args[#args + 1] = "--env"
    args[#args + 1] = k .. "=" .. (rbe.is_secret(o.env[k]) and rbe.reveal(o.env[k]) or tostring(o.env[k]))
  end
  for _, p in ipairs(o.ports or {}) do args[#args + 1] = "--publish"; args[#args + 1] = p end
  for _, v in ipairs(o.volumes or {}) do args[#args + 1] = "--volume"; args[#args + 1] = v end
  if o.network then args[#args + 1] = "--network"; args[#args + 1] = o.network end
  if o.restart then args[#args + 1] = "--restart"; args[#args + 1] = o.restart end
  for _, a in ipairs(o.args or {}) do args[#args + 1] = a end
  args[#args + 1] = o.image
  for _, a in ipairs(o.cmd or {}) do args[#args + 1] = a end
  local r = self:_run("run " .. o.image, table.unpack(args))
  return (r.stdout:gsub("%s+$", ""))
end

local DK_STEP = { container = true, docker = true, host = true, run = true }

local function dk_of(o, ctx)
  local c = resolved(o, ctx, { "docker", "host" })
  return M.docker(c)
end

local function describe_ct(ct)
  if not ct then return "no such container" end
  return format("%s, %s", tostring(ct.status), tostring(ct.image))
end

local function dk_step(verb, undo_verb, o, fname)
  local spec = step_base(o, DK_STEP, fname)
  if o.container == nil then error(fname .. ": container is required", 2) end
  spec.run = function(ctx)
    local d, name = dk_of(o, ctx), resolve(o.container, ctx)
    local ct = d[verb](d, name)
    return { container = name, status = ct and ct.status }
  end
  spec.undo = function(ctx)
    local d = dk_of(o, ctx)
    d[undo_verb](d, resolve(o.container, ctx))
  end
  spec.plan = function(ctx)
    local d, name = dk_of(o, ctx), resolve(o.container, ctx)
    return format("would %s container %s (now %s); undo %ss it", verb, name,
      describe_ct(d:inspect(name)), undo_verb)
  end
  return spec
end

-- service.docker_stop_step{container, docker, host} (undo: start),
-- docker_start_step{container, ...} (undo: stop)
function M.docker_stop_step(o) return dk_step("stop", "start", o, "service.docker_stop_step") end
function M.docker_start_step(o) return dk_step("start", "stop", o, "service.docker_start_step") end

-- service.docker_run_step{run = {image, name, ...}, docker, host} (undo:
-- remove the container it started)
function M.docker_run_step(o)
  local spec = step_base(o, DK_STEP, "service.docker_run_step")
  if o.run == nil then error("service.docker_run_step: run = {image = ..., ...} is required", 2) end
  spec.run = function(ctx)
    local r = resolve(o.run, ctx)
    local id = dk_of(o, ctx):run(r)
    return { id = id, name = r.name, image = r.image }
  end
  spec.undo = function(ctx)
    local res = ctx.results[ctx.step]
    if type(res) == "table" and res.id then dk_of(o, ctx):rm(res.id, { force = true }) end
  end
  spec.plan = function(ctx)
    local r = resolve(o.run, ctx)
    return format("would run %s%s; undo removes it", tostring(r.image),
      r.name and (" as " .. r.name) or "")
  end
  return spec
end

return M
