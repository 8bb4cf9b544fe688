-- playbooks/demo.lua: `make demo`, a real rollback drill.
--
--   rbe run playbooks/demo.lua [--state-dir DIR] [--reason TEXT]
--   rbe playbooks/demo.lua [--state-dir DIR] [--reason TEXT]
--
-- A plain script (not a playbook): it starts the drill environment
-- (drill/up.lua: PostgreSQL, Redis with BullMQ queues, the Node app under
-- pm2, a fake Vercel; see drill/README.md) at its bad release 2.0.0, shows
-- it broken, rolls it back with `rbe run playbooks/phase2.lua` (live
-- progress on this terminal), shows it healthy at 1.4.0 with its rows
-- kept, prints the run's report, and always takes the drill down again,
-- on failure and on Ctrl-C too.  Exit status: the rollback's.
--
-- The phase 2 runbook has manual steps (status page, stakeholders) and
-- confirmations; `make demo` may run without a terminal, so the demo
-- passes --yes and says so.  The run's journal and report go to
-- DIR/runs (default build/demo-state), the drill's state to DIR/drill.
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local http = require "rbe.http"
local pg = require "rbe.pg"

local format, concat = string.format, table.concat

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
if here:sub(1, 1) ~= "/" then here = rbe.whoami().cwd .. "/" .. here end
local ROOT = here:gsub("/playbooks$", "")
local RBE = proc.output { "readlink", "-f", "/proc/" .. rbe.whoami().pid .. "/exe" }
-- `rbe run FILE` runs a plain script too, but keeps os.exit for itself
local UNDER_RUN = arg == nil or arg[-1] == nil

-- options: from arg (`rbe playbooks/demo.lua ...`) or, under `rbe run`
-- (which keeps its own options), from this process's command line
local function options()
  local argv = {}
  for i = 1, #(arg or {}) do argv[#argv + 1] = arg[i] end
  if #argv == 0 then
    local f = io.open("/proc/self/cmdline", "rb")
    if f then
      local all = f:read("a")
      f:close()
      for a in all:gmatch("([^%z]*)%z") do argv[#argv + 1] = a end
    end
  end
  local o = {}
  local i = 1
  while i <= #argv do
    local a = argv[i]
    local k, v = a:match("^%-%-([%w-]+)=(.*)$")
    if not k then
      k = a:match("^%-%-([%w-]+)$")
      if k and (k == "state-dir" or k == "reason") then
        v = argv[i + 1]
        i = i + 1
      end
    end
    if k == "state-dir" or k == "reason" then o[k] = v end
    i = i + 1
  end
  return o
end

local opts = options()
local STATE = opts["state-dir"] or (ROOT .. "/build/demo-state")
if STATE:sub(1, 1) ~= "/" then STATE = rbe.whoami().cwd .. "/" .. STATE end
local REASON = opts.reason or "make demo"
local DRILL = STATE .. "/drill"

local tty = rbe.isatty(1) and os.getenv("NO_COLOR") == nil
local function bold(s) return tty and ("\27[1m" .. s .. "\27[0m") or s end
local function red(s) return tty and ("\27[31m" .. s .. "\27[0m") or s end
local function green(s) return tty and ("\27[32m" .. s .. "\27[0m") or s end

local function say(fmt, ...)
  io.stdout:write(select("#", ...) > 0 and fmt:format(...) or fmt, "\n")
  io.stdout:flush()
end

local function read_kv(path)
  local t = {}
  for line in fs.lines(path) do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then t[k] = v end
  end
  return t
end

---------------------------------------------------------------------------
-- the state of the stack, as an operator would look at it

local TABLES = { "organizations", "users", "work_orders", "messages" }

local function get_json(url, token)
  local ok, res = rbe.try(http.get, url, { timeout = "3s", raise = false, retries = 0,
    auth = token and { bearer = rbe.secret(token) } or nil })
  if not ok then return nil end
  local jok, body = pcall(res.json, res)
  return jok and body or nil, res.status
end

-- ERROR lines the app writes to its log during the next `seconds`
local function errors_during(E, seconds)
  local size = (fs.stat(E.DRILL_APP_LOG) or { size = 0 }).size
  rbe.sleep(seconds)
  local f <close> = assert(io.open(E.DRILL_APP_LOG, "rb"))
  f:seek("set", size)
  local n = 0
  for line in f:lines() do
    if line:find(" ERROR ", 1, true) then n = n + 1 end
  end
  return n
end

local WINDOW = 2   -- seconds of watching the log

local function look(E)
  local s = { errors = errors_during(E, WINDOW) }
  rbe.all {
    function() s.health = get_json(E.DRILL_APP_URL .. "/health") end,
    function() s.metrics = get_json(E.DRILL_APP_URL .. "/api/metrics") end,
    function()
      local p = get_json(E.DRILL_VERCEL_URL .. "/v9/projects/" .. E.DRILL_PROJECT, E.DRILL_VERCEL_TOKEN)
      s.vercel = p and p.targets and p.targets.production
    end,
    function()
      local db <close> = pg.connect(rbe.secret(E.DRILL_PG_URL))
      s.schema = db:query("select version::text as v, dirty from schema_migrations")[1]
      local sel = {}
      for _, t in ipairs(TABLES) do sel[#sel + 1] = format("(select count(*) from %s) as %s", t, t) end
      s.rows = db:query("select " .. concat(sel, ", "))[1]
      s.attachments = db:query("select to_regclass('message_attachments') is not null as x")[1].x
      s.flag = (db:query("select enabled from feature_flags where name = 'photo_first'")[1] or {}).enabled
    end,
  }
  s.env_flag = fs.read(E.DRILL_ENV_FILE):match("\nFEATURE_PHOTO_FIRST=(%w+)") or "unset"
  return s
end

local function show(title, s, before)
  say("")
  say(bold(title))
  local h = s.health
  local status = h and h.status or "unreachable"
  local paint = status == "ok" and green or red
  say("  app       %s   version %s (%s)   api %s, database %s, redis %s",
    paint(format("%-8s", status)), h and h.version or "?", h and tostring(h.commit):sub(1, 7) or "?",
    h and h.api or "?", h and h.database or "?", h and h.redis or "?")
  local m = s.metrics
  say("  errors    %d ERROR lines in %d s; %s", s.errors, WINDOW,
    m and format("%.1f%% of %d API requests failed since the app started", (m.error_rate or 0) * 100,
      m.requests or 0) or "no metrics")
  local v = s.vercel
  say("  vercel    production = %s (%s)", v and v.id or "?",
    v and v.meta and v.meta.appVersion or "?")
  say("  schema    %s%s; message_attachments %s; photo_first flag: db %s, .env %s",
    s.schema and s.schema.v or "?", s.schema and s.schema.dirty and " (DIRTY)" or "",
    s.attachments and "present" or "gone", tostring(s.flag), s.env_flag)
  local bits = {}
  for _, t in ipairs(TABLES) do
    local n = s.rows and s.rows[t]
    local mark = ""
    if before and before.rows then
      local b = before.rows[t]
      mark = n == b and " (kept)" or (n and b and n < b) and red(format(" (%d lost)", b - n)) or ""
    end
    bits[#bits + 1] = format("%s %s%s", t, tostring(n), mark)
  end
  say("  rows      %s", concat(bits, ", "))
end

---------------------------------------------------------------------------

local function drill(script)
  return proc.run({ RBE, ROOT .. "/drill/" .. script, DRILL },
    { check = false, timeout = "180s", stderr = "pipe", stdout = "pipe" })
end

local function last_line(s, pat)
  local found
  for line in (s or ""):gmatch("[^\n]+") do
    if not pat or line:find(pat) then found = line end
  end
  return found or ""
end

local function newest_run()
  local runs = STATE .. "/runs"
  if not fs.exists(runs) then return nil end
  local list = fs.list(runs)
  return list[#list]
end

local started = false

local function demo()
  say(bold("rbe demo: roll a broken release back with playbooks/phase2.lua"))
  say("")
  say("$ rbe drill/up.lua %s", DRILL)
  fs.mkdir(STATE)
  local r = drill("up.lua")
  started = true
  if r.code ~= 0 then
    io.stderr:write(r.stderr)
    error("the drill did not start (see above)", 0)
  end
  say("%s", last_line(r.stderr, "^drill: up in"))
  local E = read_kv(DRILL .. "/drill.env")
  local before = look(E)
  show("BEFORE: release 2.0.0 is live and broken", before)

  local previous = newest_run()
  local argv = { RBE, "run", ROOT .. "/playbooks/phase2.lua", "--yes",
    "--state-dir", STATE, "--reason", REASON }
  say("")
  say(bold(("$ rbe run playbooks/phase2.lua --yes --reason %q"):format(REASON))
    .. "      # vars: the drill's drill.env")
  say("  (--yes: `make demo` may have no terminal to answer on, so the runbook's manual")
  say("  steps, status page and stakeholders, are confirmed automatically and journaled as such)")
  say("")
  local run = proc.run(argv, { env = E, stdout = "inherit", stderr = "inherit", check = false,
    timeout = "20m", cwd = ROOT })

  local after = look(E)
  show(run.code == 0 and "AFTER: back at 1.4.0" or "AFTER: the rollback did not finish", after, before)
  local id = newest_run()
  if id and id ~= previous then
    say("")
    say("report:  %s/runs/%s/report.md", STATE, id)
    say("journal: %s/runs/%s/journal.jsonl   (rbe show %s --state-dir %s)", STATE, id, id, STATE)
  end
  return run.code
end

local ok, code = xpcall(demo, function(e)
  if rbe.is_error(e) and e.kind == "cancelled" then return e end
  return debug.traceback(tostring(e), 2)
end)

-- always: take the drill down (shielded: a Ctrl-C does not stop it)
if started or fs.exists(DRILL) then
  rbe.shield(function()
    say("")
    say("$ rbe drill/down.lua %s", DRILL)
    local r = drill("down.lua")
    say("%s", r.code == 0 and last_line(r.stderr, "^drill: down") or red("drill/down.lua failed:\n" .. r.stderr))
  end)
end

local function finish(status, msg)
  if msg then io.stderr:write("demo: ", msg, "\n") end
  if status == 0 then return end
  -- under `rbe run` a plain script cannot choose its exit status: an error
  -- makes it exit 2 (`rbe playbooks/demo.lua` exits with the real status)
  if UNDER_RUN then error(msg or ("the rollback exited " .. status), 0) end
  os.exit(status)
end

if not ok then
  if rbe.is_error(code) and code.kind == "cancelled" then finish(130, "interrupted") end
  finish(1, tostring(code))
end
finish(code, code ~= 0 and ("the rollback exited " .. code) or nil)
