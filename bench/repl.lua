-- bench/repl.lua RBE: what the console costs.  Run by bench/bench_repl.sh.
--   startup   `rbe repl </dev/null` against `rbe bench/empty.lua` (the
--             console's Lua, rbe.pretty and libedit's module on top of
--             rbe's own start), REPL_STARTUP_RUNS (30) runs each;
--   lines     a piped session of REPL_N (2000) lines against two floors
--             measured in the same run: lua5.4 compiling and running the
--             same lines from stdin (no tasks, no printing of tables), and
--             rbe running each line as a task and printing tostring() of
--             the results (`rbe bench/repl.lua --floor`); the console adds
--             pretty printing and its audit log (one fsync'd record per
--             line), shown with the state dir on disk and on tmpfs;
--   pretty    rbe.pretty.rows on a 1000-row, 5-column result against a
--             plain string.format loop over the same rows.
-- Prints figures and ratios; never passes or fails on them.
local rbe = require "rbe"

local function floor_mode()
  -- each line as a task, like the console, without its printing and audit
  local n = 0
  for line in io.lines() do
    local f = load("return " .. line, "=stdin") or load(line, "=stdin")
    local t = rbe.spawn(function() return table.pack(f()) end)
    local r = t:join()
    for i = 1, r.n do io.write(tostring(r[i]), i < r.n and "\t" or "\n") end
    n = n + 1
  end
  return n
end

if arg[1] == "--floor" then floor_mode() return end

local proc = require "rbe.proc"
local fs = require "rbe.fs"
local pretty = require "rbe.pretty"

local RBE = arg[1] or "build/bin/rbe"
local N = tonumber(os.getenv("REPL_N") or "2000")
local RUNS = tonumber(os.getenv("REPL_STARTUP_RUNS") or "30")
local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "bench"
local tmp = fs.tmpdir("rbe-bench-repl-")
local shm = fs.exists("/dev/shm") and fs.tmpdir("/dev/shm/rbe-bench-repl-")

local function bench()

  local function time(f, runs)
    runs = runs or 1
    local t0 = rbe.now()
    for _ = 1, runs do f() end
    return (rbe.now() - t0) / runs
  end

  local function ms(s) return ("%.2f ms"):format(s * 1000) end

  -- startup
  local empty = here .. "/empty.lua"
  local t_empty = time(function() proc.run({ RBE, empty }) end, RUNS)
  local t_repl = time(function()
    proc.run({ RBE, "repl", "--state-dir", tmp .. "/s0" }, { env = { RBE_HISTORY = "" } })
  end, RUNS)
  io.write(("startup: rbe empty.lua %s, rbe repl (stdin at EOF) %s: %.2fx, +%s"):format(
    ms(t_empty), ms(t_repl), t_repl / t_empty, ms(t_repl - t_empty)), "\n")

  -- lines
  local lines = {}
  for i = 1, N do
    local k = i % 4
    if k == 1 then lines[i] = "x = (x or 0) + 1"
    elseif k == 2 then lines[i] = "x"
    elseif k == 3 then lines[i] = "t = {a = x, b = {1, 2, 3}, c = 'str'}"
    else lines[i] = "t.a + #t.b" end
  end
  local input = table.concat(lines, "\n") .. "\n"
  local function piped(argv, env)
    local r
    local secs = time(function()
      r = proc.run(argv, { stdin = input, env = env, timeout = "10m" })
    end)
    return secs, r
  end
  local results = {}
  local has_lua = proc.run({ "sh", "-c", "command -v lua5.4" }, { check = false }).code == 0
  if has_lua then
    results[#results + 1] = { "lua5.4 (load + call, no tasks)", piped({ "lua5.4", "-e",
      "for l in io.lines() do local f = load('return '..l) or load(l) " ..
      "local r = table.pack(f()) for i = 1, r.n do io.write(tostring(r[i]), " ..
      "i < r.n and '\\t' or '\\n') end end" }) }
  end
  local floor = piped({ RBE, here .. "/repl.lua", "--floor" })
  results[#results + 1] = { "rbe floor (a task per line)", floor }
  results[#results + 1] = { "rbe repl, audit on " .. tmp:match("^/[^/]*"),
    piped({ RBE, "repl", "--state-dir", tmp .. "/s1" }, { RBE_HISTORY = "" }) }
  if shm then
    results[#results + 1] = { "rbe repl, audit on /dev/shm",
      piped({ RBE, "repl", "--state-dir", shm .. "/s1" }, { RBE_HISTORY = "" }) }
  end
  print(("lines: %d piped lines"):format(N))
  for _, r in ipairs(results) do
    print(("  %-34s %8.1f ms  %7.0f lines/s  %5.2fx the rbe floor"):format(
      r[1], r[2] * 1000, N / r[2], r[2] / floor))
  end

  -- pretty
  local rows = { columns = { "id", "org", "state", "amount", "note" } }
  for i = 1, 1000 do
    rows[i] = { id = i, org = "org-" .. (i % 17), state = i % 3 == 0 and "queued" or "running",
                amount = i * 1.25, note = i % 5 == 0 and rbe.null or ("note " .. i) }
  end
  local t_pretty = time(function() pretty.rows(rows, { width = 200 }) end, 20)
  local t_plain = time(function()
    local out = {}
    for i, r in ipairs(rows) do
      out[i] = ("%5d | %-8s | %-8s | %10s | %s"):format(r.id, r.org, r.state,
        tostring(r.amount), tostring(r.note))
    end
    return table.concat(out, "\n")
  end, 20)
  print(("pretty: 1000 rows x 5 columns: rbe.pretty.rows %s, string.format loop %s: %.1fx"):format(
    ms(t_pretty), ms(t_plain), t_pretty / t_plain))
end

local ok, err = pcall(bench)
fs.remove(tmp, { recursive = true })
if shm then fs.remove(shm, { recursive = true }) end
if not ok then error(err, 0) end
