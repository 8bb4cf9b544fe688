-- rbe.pbcli: the playbook commands of the CLI: run, plan, resume, history,
-- show.  Each returns the process exit code (see `rbe help exit-codes`).
local rbe = require "rbe"

-- the engine's modules load only when a playbook runs: `rbe run script.lua`
-- starts as fast as `rbe script.lua`
local lazy = setmetatable({}, { __index = function(t, k)
  local m = require(k == "cjson" and "cjson" or ("rbe." .. k))
  rawset(t, k, m)
  return m
end })
local function pb() return lazy.playbook end

local M = {}

local EXIT = require("rbe.pbload").EXIT

-- help texts live in rbe.help (loaded only when asked for)
M.HELP = setmetatable({}, { __index = function(_, k) return require("rbe.help")[k] end })

local function usage_error(msg)
  io.stderr:write("rbe: ", msg, "\nRun 'rbe help' for usage.\n")
  return EXIT.usage
end

local FLAGS = { yes = true, json = true, quiet = true, verbose = true,
                no_color = true, force = true, rerun_unknown = true,
                skip_unknown = true, no_fsync = true, once = true,
                dry_run = true, help = true }
local VALUES = { var = true, var_file = true, reason = true, as = true,
                 state_dir = true, max_checks = true }
local SHORT = { y = "yes", q = "quiet", v = "verbose", h = "help" }

-- Parse the options of a playbook command (run, plan, resume, history,
-- show, watch); `allowed` lists the ones this command takes.  --var and
-- --var-file accumulate; positional arguments are collected in order.
local function parse(args, allowed)
  local o = { vars = {}, var_files = {}, pos = {} }
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--" then
      for j = i + 1, #args do o.pos[#o.pos + 1] = args[j] end
      break
    end
    local long, inline = a:match("^%-%-([%w-]+)=(.*)$")
    long = long or a:match("^%-%-([%w-]+)$")
    local short = not long and a:match("^%-(%a)$")
    if short then long = SHORT[short] or ("?" .. short) end
    if long then
      local key = long:gsub("-", "_")
      if allowed and not allowed[key] then return nil, "unknown option " .. a end
      if FLAGS[key] then
        o[key] = true
      elseif VALUES[key] then
        local v = inline
        if v == nil then
          i = i + 1
          v = args[i]
          if v == nil then return nil, "option " .. a .. " needs a value" end
        end
        if key == "var" then
          local k, val = v:match("^([%w_]+)=(.*)$")
          if not k then return nil, "--var expects NAME=VALUE, got '" .. v .. "'" end
          o.vars[k] = val
        elseif key == "var_file" then
          o.var_files[#o.var_files + 1] = v
        else
          o[key] = v
        end
      else
        return nil, "unknown option " .. a
      end
    else
      o.pos[#o.pos + 1] = a
    end
    i = i + 1
  end
  return o
end

M.parse = parse

local RUN_OPTS = { var = 1, var_file = 1, yes = 1, reason = 1, as = 1, json = 1,
                   quiet = 1, verbose = 1, state_dir = 1, no_color = 1, no_fsync = 1 }
local PLAN_OPTS = { var = 1, var_file = 1, json = 1, state_dir = 1, no_color = 1 }
local RESUME_OPTS = { var = 1, var_file = 1, yes = 1, as = 1, json = 1, quiet = 1,
                      verbose = 1, state_dir = 1, no_color = 1, force = 1,
                      rerun_unknown = 1, skip_unknown = 1, reason = 1, no_fsync = 1 }

-- Run f(); a playbook or usage error becomes its message and exit 2.
local function guarded(f)
  local ok, res = rbe.try(f)
  if ok then return res end
  local e = res
  if e.kind == "playbook" or e.kind == "usage" or e.kind == "journal" then
    io.stderr:write("rbe: ", e.message, "\n")
    if e.traceback and os.getenv("RBE_DEBUG") then io.stderr:write(e.traceback, "\n") end
    return EXIT.usage
  end
  error(e, 0)
end

local function load_book(path, o, script_args)
  if script_args then
    local a = { [0] = path }
    for i, v in ipairs(script_args) do a[i] = v end
    _G.arg = a
  end
  local root, text = require("rbe.pbload").load_chunk(path)
  local pbm = package.loaded["rbe.playbook"]
  if not (pbm and pbm.is_playbook(root)) then return nil end  -- a plain script
  return pbm.from_root(root, path, text, { vars = o.vars, var_files = o.var_files })
end

local function run_opts(o)
  return { yes = o.yes, reason = o.reason, as = o.as, json = o.json,
           quiet = o.quiet, verbose = o.verbose, state_dir = o.state_dir,
           no_color = o.no_color, fsync = not o.no_fsync,
           rerun_unknown = o.rerun_unknown, skip_unknown = o.skip_unknown }
end

function M.run(args)
  local o, err = parse(args, RUN_OPTS)
  if not o then return usage_error(err) end
  local path = o.pos[1]
  if not path then return usage_error("rbe run: missing FILE") end
  return guarded(function()
    local extra = {}
    for i = 2, #o.pos do extra[#extra + 1] = o.pos[i] end
    local book = load_book(path, o, extra)
    if not book then return EXIT.ok end     -- a plain script: it has run
    local run = lazy.runner.new(book, run_opts(o))
    return run:execute()
  end)
end

function M.plan(args)
  local o, err = parse(args, PLAN_OPTS)
  if not o then return usage_error(err) end
  local path = o.pos[1]
  if not path then return usage_error("rbe plan: missing FILE") end
  if #o.pos > 1 then return usage_error("rbe plan: unexpected argument " .. o.pos[2]) end
  return guarded(function()
    local book = load_book(path, o)
    if not book then return usage_error(path .. " does not return a playbook") end
    if o.json then
      local mask = lazy.runner.make_mask(book)
      local out = { ev = "plan", playbook = book.name, path = book.path,
                    sha256 = book.sha256, vars = pb().display_vars(book), nodes = {} }
      for _, e in ipairs(lazy.runner.plan(book)) do
        local n = e.node
        out.nodes[#out.nodes + 1] = {
          kind = n.kind, name = n.name, depth = e.depth, where = n.where,
          undo = n.kind == "step" and n.undo ~= nil or nil,
          budget = n.budget, limit = n.limit, detail = lazy.runner.describe(n),
          plan = e.plan ~= nil and lazy.journal.sanitize(e.plan, mask) or nil,
          plan_error = e.plan_error and mask(e.plan_error) or nil }
      end
      io.write(lazy.cjson.encode(out), "\n")
    else
      io.write(lazy.runner.plan_text(book))
    end
    return EXIT.ok
  end)
end

local function run_dir_of(o, id)
  local state = lazy.journal.state_dir(o.state_dir)
  if not id or not id:match("^[%w._-]+$") then return nil end
  return state .. "/runs/" .. id
end

function M.resume(args)
  local o, err = parse(args, RESUME_OPTS)
  if not o then return usage_error(err) end
  local id = o.pos[1]
  if not id then return usage_error("rbe resume: missing RUN_ID") end
  if o.rerun_unknown and o.skip_unknown then
    return usage_error("--rerun-unknown and --skip-unknown exclude each other")
  end
  return guarded(function()
    local dir = run_dir_of(o, id)
    local jpath = dir and (dir .. "/journal.jsonl")
    if not jpath or not lazy.fs.exists(jpath) then
      return usage_error("no run " .. tostring(id) .. " in " .. lazy.journal.state_dir(o.state_dir) .. "/runs")
    end
    local ok, why = lazy.journal.check_private(jpath)
    if not ok then return usage_error("refusing to resume: " .. why) end
    local ok2, why2 = lazy.journal.check_private(dir)
    if not ok2 then return usage_error("refusing to resume: " .. why2) end
    local events, torn = lazy.journal.read(jpath)
    local prev = lazy.runner.previous(events)
    if not prev.start then return usage_error("journal of " .. id .. " has no run start") end
    if prev.ended and prev.ended.exit_code ~= EXIT.interrupted then
      return usage_error(("run %s already ended (%s, exit %s): start a new run instead")
        :format(id, tostring(prev.ended.status), tostring(prev.ended.exit_code)))
    end
    if prev.undoing and not prev.ended then
      return usage_error(("run %s stopped while undoing: finish the undo by hand "
        .. "(see %s/report.md and the journal)"):format(id, dir))
    end
    -- vars: the journal's (secrets were masked: they must come again)
    for k, v in pairs(prev.start.vars or {}) do
      if o.vars[k] == nil and v ~= "***" then o.vars[k] = type(v) == "string" and v or tostring(v) end
    end
    local book = load_book(prev.start.path, o)
    if not book then return usage_error(prev.start.path .. " no longer returns a playbook") end
    if book.sha256 ~= prev.start.sha256 and not o.force then
      return usage_error(("the playbook %s changed since run %s started (sha256 %s, now %s): "
        .. "pass --force to resume anyway"):format(book.path, id,
        tostring(prev.start.sha256):sub(1, 12), book.sha256:sub(1, 12)))
    end
    local opts = run_opts(o)
    opts.reason = o.reason or prev.start.reason
    opts.as = o.as or prev.start.user
    local run = lazy.runner.new(book, opts)
    run.prev = prev
    run.run_id = id
    if torn then io.stderr:write("rbe: the journal's last line was torn (a crash mid-write); ignoring it\n") end
    return run:execute()
  end)
end

local function summarize(dir, id)
  local ok, events = pcall(lazy.journal.read, dir .. "/journal.jsonl")
  if not ok then return { id = id, status = "unreadable" } end
  local s = { id = id, status = "running or crashed" }
  for _, ev in ipairs(events) do
    if ev.ev == "run_start" then
      s.playbook, s.user, s.started, s.path = ev.playbook, ev.user, ev.ts, ev.path
      s.single = ev.single_step or ev.single_undo
    elseif ev.ev == "run_end" then
      s.status, s.duration, s.exit_code = ev.status, ev.duration, ev.exit_code
    elseif ev.ev == "resume" then
      s.status = "running or crashed"
    end
    s.last = ev.ts
  end
  if not s.duration and s.started and s.last then s.duration = s.last - s.started end
  return s
end

function M.history(args)
  local o, err = parse(args, { state_dir = 1, json = 1 })
  if not o then return usage_error(err) end
  local runs = lazy.journal.state_dir(o.state_dir) .. "/runs"
  if not lazy.fs.exists(runs) then
    if o.json then io.write("[]\n") else io.write("no runs in ", runs, "\n") end
    return EXIT.ok
  end
  local list = {}
  for _, id in ipairs(lazy.fs.list(runs)) do list[#list + 1] = summarize(runs .. "/" .. id, id) end
  table.sort(list, function(a, b) return (a.started or 0) < (b.started or 0) end)
  if o.json then
    io.write(lazy.cjson.encode(list), "\n")
    return EXIT.ok
  end
  io.write(("%-24s %-28s %-10s %-20s %9s  %s\n"):format("run", "playbook", "user",
    "started (UTC)", "duration", "status"))
  for _, s in ipairs(list) do
    io.write(("%-24s %-28s %-10s %-20s %9s  %s\n"):format(s.id,
      (s.playbook or "?"):sub(1, 28), (s.user or "?"):sub(1, 10),
      s.started and os.date("!%Y-%m-%d %H:%M:%S", math.floor(s.started)) or "?",
      s.duration and lazy.progress.fmt_dur(s.duration) or "-",
      s.status .. (s.single and (" (single: " .. s.single .. ")") or "")))
  end
  return EXIT.ok
end

function M.show(args)
  local o, err = parse(args, { state_dir = 1 })
  if not o then return usage_error(err) end
  local id = o.pos[1]
  if not id then return usage_error("rbe show: missing RUN_ID") end
  local dir = run_dir_of(o, id)
  if not dir or not lazy.fs.exists(dir .. "/journal.jsonl") then
    return usage_error("no run " .. tostring(id))
  end
  if lazy.fs.exists(dir .. "/report.md") then io.write(lazy.fs.read(dir .. "/report.md"), "\n") end
  local events = lazy.journal.read(dir .. "/journal.jsonl")
  io.write("## Journal (", #events, " events, ", dir, "/journal.jsonl)\n\n")
  for _, ev in ipairs(events) do
    local t = ev.ts and os.date("!%H:%M:%S", math.floor(ev.ts)) or "?"
    local what = ev.step or ev.phase or ev.playbook or ""
    local extra = ev.status or ev.reason or ""
    if ev.error and ev.error ~= lazy.cjson.null then extra = extra .. " " .. tostring(ev.error):match("^[^\n]*") end
    io.write(("%s  %-16s %-28s %s\n"):format(t, ev.ev, tostring(what), extra))
  end
  return EXIT.ok
end

return M
