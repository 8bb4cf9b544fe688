-- drill/lib.lua: what up.lua and down.lua share (loaded with dofile).
--
-- Ownership: every long-running process of a drill (the Node app under pm2
-- and pm2's daemon, the worker, the traffic generator, the fake Vercel API)
-- is started with RBE_DRILL_OWNER=<state dir> in its environment.  down
-- finds them through /proc/<pid>/environ, so it also stops a process whose
-- pid was never recorded (pm2 restarted the app, up died half-way) and never
-- a stranger that reused a recorded pid.  PostgreSQL and Redis belong to
-- tests/fixtures/servers.sh, which stops them by pid and working directory.
local proc = require "rbe.proc"
local fs = require "rbe.fs"

local M = {}

M.MARKER = ".rbe-drill"          -- marks a state directory that a drill made
M.OWNER_VAR = "RBE_DRILL_OWNER"  -- never exported by drill.env, see above

-- paths: the drill directory (of this file) and the repository root
local src = debug.getinfo(1, "S").source:match("^@(.*)$")
local dir = src:match("^(.*)/[^/]*$") or "."
if dir:sub(1, 1) ~= "/" then dir = rbe.whoami().cwd .. "/" .. dir end
dir = dir:gsub("/%./", "/"):gsub("/%.$", "")
M.DRILL_DIR = dir
M.ROOT = dir:match("^(.*)/[^/]*$")
M.SERVERS_SH = M.ROOT .. "/tests/fixtures/servers.sh"
M.NODE_MODULES = M.ROOT .. "/tests/fixtures/node/node_modules"
M.PM2 = M.NODE_MODULES .. "/pm2/bin/pm2"

function M.log(fmt, ...)
  io.stderr:write(("drill: " .. fmt .. "\n"):format(...))
end

-- an absolute, slash-trimmed version of a path given on the command line
function M.abspath(p)
  if p == nil or p == "" then return nil end
  if p:sub(1, 1) ~= "/" then p = rbe.whoami().cwd .. "/" .. p end
  p = p:gsub("/+", "/"):gsub("/%./", "/"):gsub("/%.$", ""):gsub("(.)/$", "%1")
  return p
end

---------------------------------------------------------------------------
-- KEY=VALUE files

function M.read_kv(path)
  local t = {}
  if not fs.exists(path) then return t end
  for line in fs.lines(path) do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then t[k] = v end
  end
  return t
end

-- append one KEY=VALUE line (fsync'd: a crash right after still finds it)
function M.append_kv(path, k, v)
  fs.append(path, ("%s=%s\n"):format(k, v), { fsync = true })
end

---------------------------------------------------------------------------
-- processes

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end
M.read_file = read_file

-- alive(pid): exists and is not a zombie
function M.alive(pid)
  pid = tonumber(pid)
  if not pid then return false end
  local s = read_file("/proc/" .. pid .. "/stat")
  if not s then return false end
  local st = s:match("%) (%a)")
  return st ~= nil and st ~= "Z" and st ~= "X"
end

-- owned_by(pid, state_dir): the process carries RBE_DRILL_OWNER=state_dir
function M.owned_by(pid, state_dir)
  local env = read_file("/proc/" .. pid .. "/environ")
  if not env then return false end
  local want = M.OWNER_VAR .. "=" .. state_dir
  return ("\0" .. env):find("\0" .. want .. "\0", 1, true) ~= nil
end

-- every live process of this drill
function M.owned_pids(state_dir)
  local me = rbe.whoami().pid
  local out = {}
  for _, name in ipairs(fs.list("/proc")) do
    local pid = tonumber(name)
    if pid and pid ~= me and M.alive(pid) and M.owned_by(pid, state_dir) then
      out[#out + 1] = pid
    end
  end
  return out
end

local function signal(sig, pids)
  if #pids == 0 then return end
  local argv = { "kill", "-" .. sig }
  for _, p in ipairs(pids) do argv[#argv + 1] = tostring(p) end
  proc.run(argv, { check = false, stderr = "null" })
end

-- stop(state_dir, grace): SIGTERM every owned process, SIGKILL what is left
-- after `grace` seconds; returns the pids that survived (should be none)
function M.stop_owned(state_dir, grace)
  local pids = M.owned_pids(state_dir)
  if #pids == 0 then return {} end
  signal("TERM", pids)
  local deadline = rbe.now() + (grace or 5)
  while rbe.now() < deadline do
    local left = {}
    for _, p in ipairs(pids) do
      if M.alive(p) and M.owned_by(p, state_dir) then left[#left + 1] = p end
    end
    if #left == 0 then return {} end
    rbe.sleep(0.05)
  end
  local left = M.owned_pids(state_dir)
  signal("KILL", left)
  deadline = rbe.now() + 5
  while rbe.now() < deadline do
    left = M.owned_pids(state_dir)
    if #left == 0 then return {} end
    rbe.sleep(0.05)
  end
  return left
end

---------------------------------------------------------------------------
-- down: stop everything, remove the state.  Idempotent; works on a drill
-- that never finished starting.

function M.down(state_dir)
  local t0 = rbe.now()
  if not fs.exists(state_dir) then return true end
  if not fs.exists(state_dir .. "/" .. M.MARKER) then
    if #fs.list(state_dir) == 0 then
      fs.remove(state_dir)
      return true
    end
    error(("%s was not made by drill/up.lua (no %s); not touching it")
      :format(state_dir, M.MARKER), 0)
  end
  local st = M.read_kv(state_dir .. "/state")
  local ok = true

  -- pm2 first: a live daemon would restart the app we kill
  local pm2_home = st.PM2_HOME
  if pm2_home and fs.exists(pm2_home .. "/pm2.pid") and fs.exists(M.PM2) then
    local daemon = tonumber((read_file(pm2_home .. "/pm2.pid") or ""):match("%d+"))
    if daemon and M.alive(daemon) and M.owned_by(daemon, state_dir) then
      local r = rbe.try(proc.run, { "node", M.PM2, "kill" }, {
        env = { PM2_HOME = pm2_home, PM2_DISABLE_VERSION_CHECK = "true" },
        timeout = "15s", check = false, stdout = "null", stderr = "null" })
      if not r then M.log("pm2 kill failed; killing its processes") end
    end
  end

  local left = M.stop_owned(state_dir, 5)
  if #left > 0 then
    M.log("processes still alive after SIGKILL: %s", table.concat(left, " "))
    ok = false
  end

  if fs.exists(state_dir .. "/servers") then
    local r = proc.run({ M.SERVERS_SH, "stop", state_dir .. "/servers" },
      { check = false, stderr = "stdout", timeout = "60s" })
    if r.code ~= 0 then
      M.log("servers.sh stop failed:\n%s", r.stdout)
      ok = false
    end
  end

  if not ok then
    error("drill: some processes did not stop; " .. state_dir .. " kept", 0)
  end
  -- a PM2_HOME outside the state dir (short socket paths) is ours to remove
  if pm2_home and pm2_home:sub(1, #state_dir + 1) ~= state_dir .. "/"
      and fs.exists(pm2_home .. "/" .. M.MARKER) then
    fs.remove(pm2_home, { recursive = true, missing_ok = true })
  end
  fs.remove(state_dir, { recursive = true, missing_ok = true })
  M.log("down in %.0f ms: %s removed", (rbe.now() - t0) * 1000, state_dir)
  return true
end

return M
