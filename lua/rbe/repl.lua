-- rbe.repl: `rbe repl`, the live incident console.  The console runs in
-- rbe's main task; each line is compiled (as `return <line>` first, like
-- lua.c) and evaluated as its own task, so a line may wait (top-level
-- await: `db = pg.connect(url)`, then `db:query(...)`) while the loop, the
-- background tasks it spawned and Ctrl-C keep working.  The terminal side
-- (libedit on a uv_poll of stdin, SIGINT, the spinner) is rbe.repl.core
-- (core/repl.c); printing is rbe.pretty.
--
--   require("rbe.repl").main(args) -> exit code   (the CLI's `rbe repl`)
--
-- Records: every evaluated line goes to <state-dir>/repl/<session>.jsonl
-- (who, where, when, the line with its secrets masked, then its outcome);
-- interactive lines go to the history file unless they hold a secret.
local rbe = require "rbe"
local fs = require "rbe.fs"
local pretty = require "rbe.pretty"
local cjson = require "cjson"

local type, pairs, ipairs, tostring, select, pcall, error, setmetatable,
  getmetatable, rawget, rawset, load =
  type, pairs, ipairs, tostring, select, pcall, error, setmetatable,
  getmetatable, rawget, rawset, load
local concat, sort, pack, unpack = table.concat, table.sort, table.pack,
  table.unpack
local fmt = string.format

local M = {}

local core        -- rbe.repl.core, loaded by main
local S           -- the running session (one per process)

local USAGE = [[
usage: rbe repl [options]

The live incident console: every line is Lua run as a task on rbe's loop,
with rbe, pg, redis, http, proc, fs and json preloaded.  Type \help inside.

options:
  --load FILE          load a playbook without running it (\steps, \run, ...)
  --var NAME=VALUE     a playbook variable (repeatable)
  --target NAME        show NAME in the prompt (red when it contains "prod")
  --reason TEXT        the reason \run and \undo record in the journal
  --state-dir DIR      audit log and journals (default $RBE_STATE_DIR or ./.rbe)
  --no-history         neither read nor write the history file
  -h, --help           this text

When stdin is not a terminal, lines are read without prompt or editing and
results are printed: `echo '=1+1' | rbe repl` prints 2.
Environment: RBE_HISTORY (history file; empty disables it), XDG_STATE_HOME,
RBE_STATE_DIR.
]]

local HELP = [[
Lua lines run as tasks: waiting calls just work (db = pg.connect(url)).
  expr, =expr          print the value(s); _ is the last result, _err the last error
  name = value         globals survive to the next line (a top-level local does not)
  rbe.spawn(fn)        a background task: keeps running, prints above the prompt
  Ctrl-C               cancel the running line (the query/child is stopped)
  Ctrl-C twice / Ctrl-D on an empty prompt: exit
commands:
  \help                this text
  \q [CODE]            exit (asks first when background tasks are alive)
  \x [on|off|auto]     expanded display of query results (toggle)
  \timing [on|off]     print each line's elapsed time (toggle)
  \jobs                background tasks started from the prompt
  \kill N              cancel background task N
  \target [NAME]       show NAME in the prompt; no NAME clears it
  \reason [TEXT]       the reason \run and \undo record (shows it without TEXT)
  \load FILE [k=v...]  load a playbook without running it
  \steps               the loaded playbook's steps
  \plan                what the playbook would change (read-only)
  \run NAME [REASON]   run one step, with its journal entry
  \undo NAME [REASON]  run one step's undo, with its journal entry]]

local COMMANDS = { "help", "q", "quit", "x", "timing", "jobs", "kill",
  "target", "reason", "load", "steps", "plan", "run", "undo" }

local KEYWORDS = { "and", "break", "do", "else", "elseif", "end", "false",
  "for", "function", "goto", "if", "in", "local", "nil", "not", "or",
  "repeat", "return", "then", "true", "until", "while" }

-- optional modules that become globals on first use: name -> module
local LAZY = { pg = "rbe.pg", redis = "rbe.redis", http = "rbe.http",
  playbook = "rbe.playbook" }

---------------------------------------------------------------------------
-- output: through core.output so nothing breaks the prompt

-- known secret values never reach the terminal, even spelled out
local function scrub(text)
  if S and next(S.secrets) then
    for _, v in ipairs(S.secret_list) do
      if text:find(v, 1, true) then
        text = text:gsub(v:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"), "***")
      end
    end
  end
  return text
end

local function out(text)
  core.output(1, scrub(text))
end

local function err_out(text)
  core.output(2, scrub(text))
end

local function red(s)
  if S and S.color then return "\27[31m" .. s .. "\27[0m" end
  return s
end

local function dim(s)
  if S and S.color then return "\27[2m" .. s .. "\27[0m" end
  return s
end

local function note(msg)
  err_out(dim(msg) .. "\n")
end

local function show_error(prefix, e)
  local msg
  if rbe.is_error(e) and e.kind == "lua" then msg = tostring(e.message)
  else msg = tostring(e) end
  err_out(red((prefix or "error: ") .. pretty.mask(msg)) .. "\n")
end

local function fmt_opts()
  local cols = core.term_size()
  return { expanded = S.expanded, width = S.edit and cols or 100 }
end

---------------------------------------------------------------------------
-- secrets: values made with rbe.secret during the session are remembered
-- so a line that spells one out is masked in the audit log and kept out
-- of the history

local function remember_secret(v)
  v = rbe.reveal(v)
  if type(v) == "number" then v = tostring(v) end
  if type(v) == "string" and #v >= 3 and not S.secrets[v] then
    S.secrets[v] = true
    S.secret_list[#S.secret_list + 1] = v
    sort(S.secret_list, function(a, b) return #a > #b end)   -- longest first
  end
end

local function escape_pattern(s)
  return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

-- the line as it may be recorded: secret literals and known secret values
-- as ***, passwords in URLs and DSNs as ***
local function mask_line(line)
  line = line:gsub("(secret%s*%(%s*)(%b\"\")", "%1\"***\"")
  line = line:gsub("(secret%s*%(%s*)(%b'')", "%1'***'")
  line = line:gsub("(secret%s*%(%s*)%[(=*)%[.-%]%2%]", "%1\"***\"")
  line = line:gsub("(secret%s*)(%b\"\")", "%1\"***\"")
  line = line:gsub("(secret%s*)(%b'')", "%1'***'")
  for _, s in ipairs(S.secret_list) do
    line = line:gsub(escape_pattern(s), "***")
  end
  return pretty.mask(line)
end

-- a line that holds a secret is not written to the history
local function sensitive(line)
  if line:find("secret%s*[%(\"'%[{]") then return true end
  if line:find("%a[%w+.-]*://[^/%s:@]*:[^@%s/]+@") then return true end
  if line:lower():find("pass[%w_]*%s*=") then return true end
  for s in pairs(S.secrets) do
    if line:find(s, 1, true) then return true end
  end
  return false
end

---------------------------------------------------------------------------
-- audit log and history

local function iso_time()
  local t = rbe.time()
  return os.date("!%Y-%m-%dT%H:%M:%S", math.floor(t)) ..
    fmt(".%03dZ", math.floor((t % 1) * 1000))
end

-- append one record; a line's record is on disk before the line runs, its
-- outcome ("result") is flushed with the next line's
local function audit(rec)
  if not S.audit_path then return end
  rec.time = iso_time()
  rec.session = S.session
  rec.user = S.ident.user
  rec.host = S.ident.host
  rec.pid = S.ident.pid
  rec.target = S.target
  local ok, e = pcall(fs.append, S.audit_path, cjson.encode(rec) .. "\n",
                      { mode = "0600", fsync = rec.event ~= "result" })
  if not ok and not S.audit_warned then
    S.audit_warned = true
    show_error("warning: cannot write the audit log: ", e)
  end
end

local function history_path()
  local env = os.getenv("RBE_HISTORY")
  if env == "" then return nil end
  if env then return env end
  local base = os.getenv("XDG_STATE_HOME")
  if not base or base == "" then
    local home = os.getenv("HOME")
    if not home or home == "" then return nil end
    base = home .. "/.local/state"
  end
  return base .. "/rbe/history"
end

local HISTORY_KEEP = 1000

local function history_load()
  local path = S.history
  if not path then return end
  local dir = path:match("^(.*)/[^/]*$")
  if dir and dir ~= "" then
    local ok, e = pcall(fs.mkdir, dir, { mode = "0700" })
    if not ok then
      show_error("warning: history disabled: ", e)
      S.history = nil
      return
    end
  end
  local st = fs.stat(path)
  if not st then return end
  local lines = {}
  local ok, e = pcall(function()
    for line in fs.lines(path) do lines[#lines + 1] = line end
  end)
  if not ok then
    show_error("warning: history disabled: ", e)
    S.history = nil
    return
  end
  local first = math.max(1, #lines - HISTORY_KEEP + 1)
  for i = first, #lines do
    if lines[i] ~= "" then core.history_add(lines[i]) end
  end
  S.last_history = lines[#lines]
  if #lines > 2 * HISTORY_KEEP then
    -- keep the file from growing without end
    pcall(fs.write, path, concat(lines, "\n", first) .. "\n", { mode = "0600" })
  end
end

local function history_add(src)
  if not S.edit then return end
  if sensitive(src) then return end
  for line in (src .. "\n"):gmatch("(.-)\n") do
    if line:find("%S") and line ~= S.last_history then
      core.history_add(line)
      S.last_history = line
      if S.history then
        local ok, e = core.history_append(S.history, line .. "\n")
        if not ok then
          note("history disabled: " .. e)
          S.history = nil
        end
      end
    end
  end
end

---------------------------------------------------------------------------
-- globals of the session

local function lazy_module(name)
  local mod = LAZY[name]
  if mod then return mod end
  if not name:match("^[%a_][%w_]*$") then return nil end
  local root = package.rbe_root
  if root and fs.exists(root .. "/modules/" .. name .. ".lua") then
    return name
  end
  return nil
end

local function lazy_index(t, k)
  if type(k) ~= "string" or S.lazy_failed[k] then return nil end
  local mod = lazy_module(k)
  if not mod then
    S.lazy_failed[k] = true
    return nil
  end
  local ok, m = pcall(require, mod)
  if not ok then
    S.lazy_failed[k] = true
    note(fmt("note: %s is not available: %s", k, tostring(m)))
    return nil
  end
  rawset(t, k, m)
  return m
end

local function format_print_args(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = pretty.mask(tostring((select(i, ...)))) end
  return concat(parts, "\t") .. "\n"
end

-- install the session's globals and hooks; returns the function undoing it
local function install()
  local saved = {
    print = _G.print, iowrite = io.write, spawn = rbe.spawn,
    secret = rbe.secret, gmt = getmetatable(_G),
  }
  _G.rbe = rbe
  _G.proc = require "rbe.proc"
  _G.fs = fs
  _G.json = cjson
  _G.print = function(...) out(format_print_args(...)) end
  setmetatable(_G, { __index = lazy_index })

  -- writes to the terminal go above the prompt, known secrets masked
  local methods = getmetatable(io.stdout).__index
  local file_write = methods.write
  if type(methods) == "table" then
    local stdout, stderr = io.stdout, io.stderr
    methods.write = function(f, ...)
      if f ~= stdout and f ~= stderr then return file_write(f, ...) end
      local parts = {}
      for i = 1, select("#", ...) do
        local v = select(i, ...)
        if type(v) ~= "string" and type(v) ~= "number" then
          error(fmt("bad argument #%d to 'write' (string expected, got %s)",
                    i, type(v)), 2)
        end
        parts[i] = tostring(v)
      end
      core.output(f == stderr and 2 or 1, scrub(concat(parts)))
      return f
    end
    io.write = function(...) return methods.write(io.output(), ...) end
  end

  local spawn = saved.spawn
  local function monitor(job)
    local ok, e = pcall(job.task.join, job.task)
    if not job.task:done() then return end    -- the monitor was cancelled
    job.ended = rbe.now()
    if job.line_task and not job.line_task:done() then return end  -- its line reports it
    local took = pretty.duration(job.ended - job.started)
    if ok then note(fmt("[%d] done (%s)", job.id, took))
    elseif rbe.is_error(e) and e.kind == "cancelled" then
      note(fmt("[%d] cancelled (%s)", job.id, took))
    else
      show_error(fmt("[%d] failed: ", job.id), e)
    end
  end
  -- tasks spawned by code typed at the prompt are the session's jobs (a
  -- module's own helpers, the runner's progress, ... are not)
  rbe.spawn = function(f, ...)
    local t = spawn(f, ...)
    local caller = debug.getinfo(2, "Sf")
    local from_prompt = caller and (caller.source == "=stdin" or
      -- `return rbe.spawn(f)` typed at the prompt is a tail call: the
      -- line's own frame is gone, its caller is the console's wrapper
      (caller.func == S.eval_closure and debug.getinfo(1, "t").istailcall))
    if not from_prompt then return t end
    local job = { id = S.next_job, task = t, line = S.current_line or "?",
                  started = rbe.now(), line_task = S.line_task }
    S.next_job = S.next_job + 1
    S.jobs[#S.jobs + 1] = job
    job.monitor = spawn(monitor, job)
    return t
  end
  rbe.secret = function(v, ...)
    local s = saved.secret(v, ...)
    remember_secret(s)
    return s
  end

  return function()
    _G.print = saved.print
    io.write = saved.iowrite
    methods.write = file_write
    rbe.spawn = saved.spawn
    rbe.secret = saved.secret
    setmetatable(_G, saved.gmt)
  end
end

---------------------------------------------------------------------------
-- running a line

-- Run fn as the line's task; Ctrl-C cancels it.  Returns ok, packed
-- results or error, elapsed seconds, number of Ctrl-C.
local function run_task(fn, label)
  local spawn = S.spawn
  local t0 = rbe.now()
  local task = spawn(fn)
  S.line_task = task
  core.line_task(task)
  -- playbook commands draw the runner's own progress: no spinner there
  if S.spinner and not label then core.spinner(true, "running") end
  local ints = 0
  local sig = spawn(core.wait_interrupt)
  local ok, e = pcall(function()
    while true do
      local i = rbe.wait_any({ task, sig })
      if i == 1 then return end
      ints = ints + 1
      if ints == 1 then
        task:cancel("interrupted (Ctrl-C)", { interrupted = true })
      else
        note("still cancelling (the line holds off cancellation); " ..
             "Ctrl-C again quits rbe")
      end
      sig = spawn(core.wait_interrupt)
    end
  end)
  sig:cancel()
  core.spinner(false)
  ints = math.max(ints, core.line_task(nil))
  if ints > 0 and S.edit then
    err_out("\r\27[K")       -- the terminal echoed ^C where the cursor was
  end
  if not ok then
    -- the console itself is cancelled (SIGTERM, os.exit): take the line along
    task:cancel()
    error(e, 0)
  end
  local elapsed = rbe.now() - t0
  if task:status() == "done" then
    return true, task:result(), elapsed, ints
  end
  return false, task:error(), elapsed, ints
end

-- compile src: try `return src` first (expressions print), then src as
-- statements.  Returns fn, is_expression | nil, message, incomplete
local function compile(src)
  local code = src
  local expr = src:match("^%s*=(.*)$")     -- =expr, as lua 5.1 had it
  if expr then code = expr end
  local f, msg = load("return " .. code, "=stdin", "t")
  if f then return f, true end
  if expr then
    if msg:sub(-5) == "<eof>" then return nil, msg, true end
    return nil, msg, false
  end
  local g
  g, msg = load(code, "=stdin", "t")
  if g then return g, false end
  if msg:sub(-5) == "<eof>" then return nil, msg, true end
  return nil, msg, false
end

-- names a top-level `local` declares (they end with the line)
local function top_locals(src)
  local names = {}
  local function scan(stmt)
    local fname = stmt:match("^local%s+function%s+([%a_][%w_]*)")
    if fname then names[#names + 1] = fname return end
    local list = stmt:match("^local%s+([%a_][%w_%s,<>]*)")
    if list then
      for n in list:gsub("<%s*%a+%s*>", ""):gmatch("[%a_][%w_]*") do
        names[#names + 1] = n
      end
    end
  end
  scan(src:match("^%s*(.*)$"))
  for stmt in src:gmatch(";%s*(local%s[^;]*)") do scan(stmt) end
  for stmt in src:gmatch("\n(local%s[^\n]*)") do scan(stmt) end
  return names
end

local function show_results(res, elapsed)
  if res.n == 0 then return end
  rawset(_G, "_", res[1])
  local o = fmt_opts()
  o.elapsed = elapsed
  local ok, text = pcall(pretty.format_all, o, unpack(res, 1, res.n))
  if not ok then text = "<cannot print: " .. tostring(text) .. ">" end
  out(text .. "\n")
end

-- the traceback down to the line's chunk: the console's own frames are
-- noise at the prompt
local function trim_traceback(e)
  if not rbe.is_error(e) or type(rawget(e, "traceback")) ~= "string" then return end
  local keep = {}
  for l in (e.traceback .. "\n"):gmatch("(.-)\n") do
    if l:find("stdin:%d+: in upvalue 'fn'") then
      keep[#keep + 1] = (l:gsub("in upvalue 'fn'", "in main chunk"))
      break
    end
    if not l:find("rbe/repl%.lua:") and l ~= "\t[C]: in ?" then keep[#keep + 1] = l end
  end
  e.traceback = concat(keep, "\n")
end

local function show_failure(e, ints)
  trim_traceback(e)
  rawset(_G, "_err", e)
  if ints > 0 and rbe.is_error(e) and e.kind == "cancelled" then
    err_out(red("cancelled (Ctrl-C)") .. "\n")
  else
    show_error(nil, e)
  end
end

local function timing(elapsed)
  if S.timing then out(fmt("Time: %.3f ms\n", elapsed * 1000)) end
end

local function error_text(e)
  return scrub(pretty.mask(tostring(e)))
end

-- run fn as a recorded line: audit before (unless the caller did: seq)
-- and after, results printed
local function evaluate(src, fn, label, seq)
  if not seq then
    S.seq = S.seq + 1
    seq = S.seq
    audit({ event = "eval", seq = seq, line = mask_line(src) })
  end
  S.current_line = src
  local ok, res, elapsed, ints = run_task(fn, label)
  if ok then show_results(res, elapsed)
  else show_failure(res, ints) end
  timing(elapsed)
  local rec = { event = "result", seq = seq, ok = ok,
                elapsed = math.floor(elapsed * 1e6) / 1e6 }
  if not ok then
    rec.error = error_text(res)
    rec.kind = rbe.is_error(res) and res.kind or nil
    if ints > 0 then rec.interrupted = true end
  end
  audit(rec)
  history_add(src)
  return ok, res
end

local function eval_lua(src)
  local fn, is_expr, incomplete = compile(src)
  local msg = is_expr
  if incomplete then return false end
  if not fn then
    S.seq = S.seq + 1
    audit({ event = "eval", seq = S.seq, line = mask_line(src) })
    local e = rbe.error("syntax", msg)
    rawset(_G, "_err", e)
    err_out(red("syntax error: " .. pretty.mask(msg)) .. "\n")
    audit({ event = "result", seq = S.seq, ok = false, kind = "syntax",
            error = error_text(msg) })
    history_add(src)
    return true
  end
  if is_expr == false then
    for _, name in ipairs(top_locals(src)) do
      note(fmt("warning: local '%s' ends with this line; write '%s = ...' "
        .. "to keep it", name, name))
    end
  end
  S.eval_closure = function() return pack(fn()) end
  evaluate(src, S.eval_closure)
  return true
end

---------------------------------------------------------------------------
-- questions, jobs, leaving

-- ask a yes/no question on the terminal; nil when there is no terminal
local function ask(question)
  if not S.edit then return nil end
  local answer = core.read(question .. " [y/N] ")
  return type(answer) == "string" and answer:match("^%s*[yY]") ~= nil
end

local function live_jobs()
  local live = {}
  for _, j in ipairs(S.jobs) do
    if not j.task:done() then live[#live + 1] = j end
  end
  return live
end

-- wait until the jobs are done; Ctrl-C cancels them (then they get 5 s)
local function wait_jobs(jobs, cancel)
  local tasks = {}
  for _, j in ipairs(jobs) do
    if cancel then j.task:cancel() end
    tasks[#tasks + 1] = j.task
    tasks[#tasks + 1] = j.monitor
  end
  local deadline = cancel and rbe.now() + 5 or nil
  local sig = S.spawn(core.wait_interrupt)
  while true do
    local live = {}
    for _, t in ipairs(tasks) do
      if not t:done() then live[#live + 1] = t end
    end
    if #live == 0 then break end
    if deadline and rbe.now() > deadline then
      note(fmt("%d task(s) still unwinding; leaving them", #live))
      break
    end
    live[#live + 1] = sig
    local ok, i = pcall(rbe.timeout, 0.5, rbe.wait_any, live)
    if ok and live[i] == sig then
      for _, j in ipairs(jobs) do j.task:cancel() end
      deadline = rbe.now() + 5
      sig = S.spawn(core.wait_interrupt)
    end
  end
  sig:cancel()
end

-- true when the session may end now
local function leave()
  local live = live_jobs()
  if #live == 0 then return true end
  if S.edit then
    if not ask(fmt("%d background task(s) still running (\\jobs): cancel "
                   .. "them and exit?", #live)) then
      return false
    end
    wait_jobs(live, true)
    return true
  end
  note(fmt("waiting for %d background task(s) (Ctrl-C cancels them)", #live))
  wait_jobs(live, false)
  return true
end

---------------------------------------------------------------------------
-- playbook commands

local function pb()
  return require "rbe.playbook"
end

local function load_book(path, vars)
  local ok, res = run_task(function()
    return pack(pb().load(path, { vars = vars }))
  end, "loading")
  if not ok then
    show_error("cannot load playbook: ", res)
    return false
  end
  if not res[1] then
    err_out(red(fmt("%s is not a playbook (it did not return pb.playbook "
      .. "\"name\" {...})", path)) .. "\n")
    return false
  end
  S.book, S.book_path, S.step_status = res[1], path, {}
  local n = 0
  local ok2, steps = pcall(function() return S.book:steps() end)
  if ok2 then n = #steps end
  for _, v in pairs(S.book.vars or {}) do
    if rbe.is_secret(v) then remember_secret(v) end
  end
  note(fmt("loaded playbook %q from %s: %d step(s); \\steps lists them",
           tostring(S.book.name), path, n))
  return true
end

local function need_book()
  if S.book then return true end
  err_out(red("no playbook loaded: rbe repl --load FILE, or \\load FILE") .. "\n")
  return false
end

local function step_names()
  local ok, steps = pcall(function() return S.book:steps() end)
  local names = {}
  if ok then for i, s in ipairs(steps) do names[i] = s.name end end
  return names
end

-- "pause queues because x" -> "pause queues", "because x" (the longest
-- step name the text starts with), or a quoted name
local function split_step(rest)
  local q, tail = rest:match('^"([^"]*)"%s*(.-)$')
  if not q then q, tail = rest:match("^'([^']*)'%s*(.-)$") end
  if q then return q, tail end
  local best
  for _, name in ipairs(step_names()) do
    if (rest == name or rest:sub(1, #name + 1) == name .. " ")
       and (not best or #name > #best) then
      best = name
    end
  end
  if best then return best, rest:sub(#best + 2):match("^%s*(.-)%s*$") end
  return rest:match("^(%S*)%s*(.-)$")
end

local function show_steps()
  local ok, steps = pcall(function() return S.book:steps() end)
  if not ok then show_error(nil, steps) return end
  local rows = { columns = { "#", "kind", "step", "undo", "this session" } }
  for i, s in ipairs(steps) do
    rows[i] = { ["#"] = i, kind = s.kind, step = s.name,
                undo = s.undo and "yes" or "",
                ["this session"] = S.step_status[s.name] or "" }
  end
  local text = pretty.rows(rows, { width = 1e9, cell_max = 80 })
  text = text:gsub("%(%d+ rows?%)$", fmt("(%d step%s in %s)", #steps,
    #steps == 1 and "" or "s", S.book_path))
  out(text .. "\n")
end

local function run_step(line, undo, rest, seq)
  if not need_book() then return end
  local name, reason = split_step(rest)
  if name == "" then
    err_out(red(fmt("usage: \\%s NAME [REASON]", undo and "undo" or "run")) .. "\n")
    return
  end
  local known = false
  for _, n in ipairs(step_names()) do if n == name then known = true end end
  if not known then
    err_out(red(fmt("no step %q in %s (\\steps lists them)", name,
                    S.book_path)) .. "\n")
    return
  end
  if reason == "" then reason = S.reason end
  if not reason or reason == "" then
    if S.edit then
      local r = core.read(fmt("reason for %s %q: ", undo and "undoing" or
                              "running", name))
      if type(r) == "string" and r:find("%S") then reason = r end
    end
    if not reason or reason == "" then
      err_out(red("a reason is required: \\" .. (undo and "undo" or "run")
        .. " NAME REASON, \\reason TEXT or --reason") .. "\n")
      return
    end
  end
  if S.target and S.target:lower():find("prod") and S.edit then
    if not ask(fmt("%s step %q against %s?", undo and "undo" or "run", name,
                   S.target)) then
      note("not run")
      return
    end
  end
  local opts = { reason = reason, user = S.ident.user, state_dir = S.state_dir }
  local book = S.book
  local verb = undo and "undo" or "run"
  local ok = evaluate(line, function()
    if undo then return pack(pb().undo_one(book, name, opts)) end
    return pack(pb().run_one(book, name, opts))
  end, (undo and "undo " or "step ") .. name, seq)
  S.step_status[name] = fmt("%s %s %s", verb, ok and "ok" or "failed",
                            os.date("%H:%M:%S"))
end

---------------------------------------------------------------------------
-- backslash commands

local function on_off(arg, current)
  if arg == "on" then return true end
  if arg == "off" then return false end
  return not current
end

local function list_jobs()
  local rows = { columns = { "job", "status", "running", "line" } }
  local keep = {}
  for _, j in ipairs(S.jobs) do
    local st = j.task:status()
    local took = pretty.duration((j.ended or rbe.now()) - j.started)
    rows[#rows + 1] = { job = j.id, status = st, running = took,
                        line = mask_line(j.line) }
    if not j.task:done() then keep[#keep + 1] = j end
  end
  S.jobs = keep            -- finished jobs are listed once
  if #rows == 0 then note("no background tasks") return end
  local text = pretty.rows(rows, { width = 1e9, cell_max = 60 })
  out((text:gsub("\n%(%d+ rows?%)$", "\n")))
end

local function command(line)
  local cmd, rest = line:match("^%s*\\(%S*)%s*(.-)%s*$")
  S.seq = S.seq + 1
  local seq = S.seq
  audit({ event = "command", seq = seq, line = mask_line(line) })
  if cmd == "help" or cmd == "?" or cmd == "h" then
    out(HELP .. "\n")
  elseif cmd == "q" or cmd == "quit" or cmd == "exit" then
    if leave() then
      S.quit = true
      S.code = tonumber(rest) and math.tointeger(tonumber(rest)) or 0
    end
  elseif cmd == "x" then
    if rest == "auto" then S.expanded = "auto"
    else S.expanded = on_off(rest, S.expanded == true) end
    note("expanded display is " .. (S.expanded == "auto" and "auto"
      or S.expanded and "on" or "off"))
  elseif cmd == "timing" then
    S.timing = on_off(rest, S.timing)
    note("timing is " .. (S.timing and "on" or "off"))
  elseif cmd == "jobs" then
    list_jobs()
  elseif cmd == "kill" then
    local n = tonumber(rest)
    local job
    for _, j in ipairs(S.jobs) do if j.id == n then job = j end end
    if not job then err_out(red("no job " .. rest .. " (\\jobs lists them)") .. "\n")
    elseif job.task:done() then note(fmt("[%d] already %s", job.id, job.task:status()))
    else
      job.task:cancel()
      note(fmt("[%d] cancelling", job.id))
    end
  elseif cmd == "target" then
    S.target = rest ~= "" and rest or nil
  elseif cmd == "reason" then
    if rest ~= "" then S.reason = rest end
    note("reason: " .. (S.reason or "(none)"))
  elseif cmd == "load" then
    local path, vars = rest:match("^(%S+)%s*(.*)$"), {}
    if not path then err_out(red("usage: \\load FILE [NAME=VALUE...]") .. "\n") return end
    for k, v in (rest:match("^%S+%s*(.*)$")):gmatch("([%w_]+)=(%S*)") do vars[k] = v end
    load_book(path, vars)
  elseif cmd == "steps" then
    if need_book() then show_steps() end
  elseif cmd == "plan" then
    if need_book() then
      local book = S.book
      local ok, res = run_task(function() return pack(pb().plan_text(book)) end,
                               "planning")
      if ok then out(tostring(res[1] or "") .. "\n")
      else show_failure(res, 0) end
    end
  elseif cmd == "run" or cmd == "undo" then
    run_step(line, cmd == "undo", rest, seq)
  else
    err_out(red(fmt("unknown command \\%s (\\help lists them)", cmd)) .. "\n")
  end
end

---------------------------------------------------------------------------
-- completion (runs outside any task: no waiting here)

local function safe_index(v, k)
  local ok, r = pcall(function() return v[k] end)
  if ok then return r end
  return nil
end

local function fields_of(v, methods_only, out_set)
  local seen = 0
  local function add_table(t)
    for k, x in pairs(t) do
      if type(k) == "string" and k:match("^[%a_][%w_]*$") then
        if not methods_only or type(x) == "function" or
           (type(getmetatable(x)) == "table" and getmetatable(x).__call) then
          out_set[k] = true
        end
      end
    end
  end
  if type(v) == "table" then add_table(v) end
  local mt = getmetatable(v)
  while type(mt) == "table" and seen < 5 do
    seen = seen + 1
    local idx = rawget(mt, "__index")
    if type(idx) ~= "table" then break end
    add_table(idx)
    mt = getmetatable(idx)
  end
end

local function complete_lua(word)
  local set = {}
  local base, sep, partial = word:match("^(.-)([%.:])([%w_]*)$")
  if not base then
    partial = word
    for k in pairs(_G) do
      if type(k) == "string" then set[k] = true end
    end
    for k in pairs(LAZY) do set[k] = true end
    for _, k in ipairs(KEYWORDS) do set[k] = true end
    base, sep = "", ""
  else
    if not base:match("^[%a_][%w_]*$") and not base:match("^[%a_][%w_%.]*[%w_]$") then
      return {}
    end
    local v = _G
    for name in base:gmatch("[^%.]+") do
      v = safe_index(v, name)
      if v == nil then return {} end
    end
    fields_of(v, sep == ":", set)
  end
  local out_list = {}
  for k in pairs(set) do
    if k:sub(1, #partial) == partial and
       (k:sub(1, 1) ~= "_" or partial:sub(1, 1) == "_") then
      out_list[#out_list + 1] = base .. sep .. k
    end
  end
  sort(out_list)
  return out_list
end

local function complete(word, before)
  local ok, res = pcall(function()
    if before:match("^%s*$") and word:sub(1, 1) == "\\" then
      local list = {}
      for _, c in ipairs(COMMANDS) do
        if ("\\" .. c):sub(1, #word) == word then list[#list + 1] = "\\" .. c end
      end
      sort(list)
      return list
    end
    local cmd, typed = before:match("^%s*\\(%S+)%s+(.*)$")
    if cmd then
      typed = typed .. word
      local list = {}
      if (cmd == "run" or cmd == "undo") and S.book then
        for _, name in ipairs(step_names()) do
          if name:sub(1, #typed) == typed then
            list[#list + 1] = word .. name:sub(#typed + 1)
          end
        end
      elseif cmd == "x" or cmd == "timing" then
        for _, v in ipairs { "on", "off", "auto" } do
          if v:sub(1, #typed) == typed then list[#list + 1] = v end
        end
      end
      sort(list)
      return list
    end
    return complete_lua(word)
  end)
  if ok then return res end
  return {}
end

M._complete = complete   -- for the tests

---------------------------------------------------------------------------
-- the session

local function prompt_text(cont)
  local label = "rbe"
  if S.target then label = "rbe:" .. S.target end
  local text = cont and (("."):rep(#label) .. "> ") or (label .. "> ")
  if not S.edit then return "" end
  if S.target and S.color and S.target:lower():find("prod") then
    -- \1 ... \1 brackets what takes no room on screen (libedit)
    return "\1\27[1;31m\1" .. text:sub(1, -3) .. "\1\27[0m\1> "
  end
  return text
end

local function loop()
  local pending
  local ints = 0
  while not S.quit do
    local line, had_text = core.read(prompt_text(pending ~= nil))
    if line == nil then
      if pending then
        note("incomplete input discarded")
        pending = nil
      end
      if leave() then break end
    elseif line == false then
      if pending or had_text then
        pending = nil
        ints = 0
      elseif not S.edit then
        if leave() then S.code = 130 break end
      else
        ints = ints + 1
        if ints >= 2 then
          if leave() then break end
          ints = 0
        else
          note("(Ctrl-C again or Ctrl-D to exit)")
        end
      end
    else
      ints = 0
      if not pending and line:match("^%s*\\") then
        command(line)
      elseif pending or line:find("%S") then
        local src = pending and (pending .. "\n" .. line) or line
        if eval_lua(src) then pending = nil else pending = src end
      end
    end
  end
end

local function parse_args(args)
  local o = { vars = {} }
  local i = 1
  local function value(name)
    i = i + 1
    local v = args[i]
    if v == nil then error({ usage = "option " .. name .. " needs a value" }) end
    return v
  end
  while i <= #args do
    local a = args[i]
    local name, inline = a:match("^(%-%-[%w-]+)=(.*)$")
    if name then a = name end
    local function val() if inline then return inline end return value(a) end
    if a == "-h" or a == "--help" then o.help = true
    elseif a == "--load" then o.load = val()
    elseif a == "--var" then
      local v = val()
      local k, x = v:match("^([%w_]+)=(.*)$")
      if not k then error({ usage = "--var wants NAME=VALUE, got " .. v }) end
      o.vars[k] = x
    elseif a == "--target" then o.target = val()
    elseif a == "--reason" then o.reason = val()
    elseif a == "--state-dir" then o.state_dir = val()
    elseif a == "--no-history" then o.no_history = true
    else error({ usage = "unknown argument " .. a }) end
    i = i + 1
  end
  return o
end

local function new_session(o)
  local edit = core.isatty(0) and core.isatty(1)
  local term = os.getenv("TERM")
  if term == "dumb" then edit = false end
  local ident = core.identity()
  local state_dir = o.state_dir or os.getenv("RBE_STATE_DIR")
  if not state_dir or state_dir == "" then state_dir = "./.rbe" end
  return {
    edit = edit,
    color = edit and os.getenv("NO_COLOR") == nil,
    spinner = edit and core.isatty(2),
    ident = ident,
    state_dir = state_dir,
    session = os.date("%Y%m%d-%H%M%S") .. "-" .. ident.pid,
    target = o.target,
    reason = o.reason,
    expanded = false,
    timing = false,
    jobs = {},
    next_job = 1,
    secrets = {},
    secret_list = {},
    lazy_failed = {},
    step_status = {},
    seq = 0,
    code = 0,
    history = (edit and not o.no_history) and history_path() or nil,
    spawn = rbe.spawn,
  }
end

local function open_audit()
  local dir = S.state_dir .. "/repl"
  local ok, e = pcall(function()
    fs.mkdir(S.state_dir, { mode = "0700" })
    fs.mkdir(dir, { mode = "0700" })
  end)
  if not ok then
    show_error("warning: no audit log: ", e)
    return
  end
  S.audit_path = dir .. "/" .. S.session .. ".jsonl"
end

-- main(args) -> exit code: 0 at the end of input or \q, \q N's N, 2 on a
-- usage error, 130 when a Ctrl-C ends a piped session
function M.main(args)
  local ok, o = pcall(parse_args, args or {})
  if not ok then
    if type(o) == "table" and o.usage then
      io.stderr:write("rbe repl: ", o.usage, "\nRun 'rbe repl --help' for usage.\n")
      return 2
    end
    error(o, 0)
  end
  if o.help then io.write(USAGE) return 0 end
  if S then error("rbe.repl: a console is already running", 2) end
  core = require "rbe.repl.core"
  S = new_session(o)
  core.start({ edit = S.edit, completer = complete })
  local uninstall = install()
  local ok2, e = pcall(function()
    open_audit()
    audit({ event = "start", edit = S.edit, state_dir = S.state_dir,
            playbook = o.load, version = rbe.version })
    history_load()
    if S.edit then
      note(fmt("rbe %s console: \\help for commands, Ctrl-D to exit",
               rbe.version or ""))
    end
    if o.load then load_book(o.load, o.vars) end
    loop()
  end)
  local code = S.code
  pcall(audit, { event = "end", code = code,
                 error = not ok2 and pretty.mask(tostring(e)) or nil })
  uninstall()
  -- tasks that modules started from the prompt would keep rbe running
  if ok2 and rbe._counts().tasks > 1 then core.cancel_all("the console exited") end
  core.stop()
  S = nil
  if not ok2 then error(e, 0) end
  return code
end

return M
