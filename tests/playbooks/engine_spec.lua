-- The playbook engine end to end: real `rbe run` / `rbe resume` children
-- on small playbooks written into a temp dir, checked through their exit
-- codes, output, journals, reports and side-effect files.
local rbe = require "rbe"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local cjson = require "cjson"

local RBE = require("support").rbe_bin()

local dir
local function path(name) return dir .. "/" .. name end

-- write a playbook; `body` is the list of nodes, `head` extra fields
local function playbook(name, head, body)
  local src = ([[
local pb = require "rbe.playbook"
local fs = require "rbe.fs"
local D = %q
local function mark(f, s) fs.append(D .. "/" .. f, s .. "\n") end
local function count(f, s)
  local ok, t = pcall(fs.read, D .. "/" .. f)
  local n = 0
  if ok then for l in t:gmatch("[^\n]+") do if l == s then n = n + 1 end end end
  return n
end
return pb.playbook %q {
%s
%s
}
]]):format(dir, name, head or "", body)
  fs.write(path(name .. ".lua"), src)
  return path(name .. ".lua")
end

local function rbe_run(args, opts)
  opts = opts or {}
  local argv = { RBE }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local env = { RBE_STATE_DIR = path("state"), NO_COLOR = "1" }
  for k, v in pairs(opts.env or {}) do env[k] = v end
  return proc.run(argv, { cwd = dir, env = env, check = false, timeout = opts.timeout or "60s",
                          stdin = opts.stdin })
end

local function lines(f)
  local ok, t = pcall(fs.read, path(f))
  local out = {}
  if ok then for l in t:gmatch("[^\n]+") do out[#out + 1] = l end end
  return out
end

local function runs()
  local d = path("state/runs")
  return fs.exists(d) and fs.list(d) or {}
end

local function events(run_id)
  local out = {}
  for l in fs.read(path("state/runs/" .. run_id .. "/journal.jsonl")):gmatch("[^\n]+") do
    out[#out + 1] = cjson.decode(l)
  end
  return out
end

local function run_id_of(r)
  return (r.stderr .. r.stdout):match("run (%d+%-%d+%-%x+)")
end

before_each(function() dir = fs.tmpdir("rbe-pb-") end)
after_each(function() fs.remove(dir, { recursive = true }) end)

describe("#playbook validation", function()
  it("a typo in a field name stops the run before anything, with file:line and a suggestion", function()
    local p = playbook("typo", nil, [[
  pb.step "first" { run = function() mark("ran", "first") end },
  pb.step "pause queues" { run = function() end, undoo = function() end },
]])
    local r = rbe_run { "run", p }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("typo.lua:14: step 'pause queues': unknown field 'undoo' (did you mean 'undo'?)", 1, true), r.stderr)
    assert.are.same({}, lines("ran"))
    assert.are.same({}, runs())
  end)

  it("a step without run, a non-function run, duplicate names: exit 2", function()
    local cases = {
      { [[pb.step "s" { undo = function() end },]], "step 's' has no run function" },
      { [[pb.step "s" { run = "rm -rf /" },]], "step 's': field 'run' must be a function, got string" },
      { [[pb.step "s" { run = function() end }, pb.step "s" { run = function() end },]], "duplicate name 's'" },
      { [[pb.step "s",]], "step 's' has no body" },
      { [[pb.step "s" { run = function() end, timeout = "soon" },]], "bad duration 'soon'" },
      { [[pb.step "s" { run = function() end, on_failure = "retry" },]], "on_failure must be" },
      { [[42,]], "item 1 is a number" },
    }
    for i, c in ipairs(cases) do
      local p = playbook("bad" .. i, nil, c[1])
      local r = rbe_run { "run", p }
      assert.are.equal(2, r.code, c[1])
      assert.truthy(r.stderr:find(c[2], 1, true), r.stderr)
      assert.truthy(r.stderr:find("bad" .. i .. ".lua:%d+"), r.stderr)
    end
  end)

  it("precompiled chunks are refused", function()
    local p = playbook("text", nil, [[pb.step "s" { run = function() end },]])
    local bc = path("compiled.lua")
    fs.write(bc, string.dump(assert(loadfile(p))))
    local r = rbe_run { "run", bc }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("precompiled chunks are refused", 1, true))
  end)

  it("unknown --var and missing required vars stop the run before any step", function()
    local p = playbook("vars", [[vars = { api = { required = true }, mode = { default = "promote" } },]],
      [[pb.step "s" { run = function() mark("ran", "s") end },]])
    local r = rbe_run { "run", p, "--var", "api=http://127.0.0.1:1", "--var", "mdoe=x" }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("unknown --var 'mdoe'", 1, true), r.stderr)
    assert.truthy(r.stderr:find("did you mean 'mode'", 1, true), r.stderr)
    r = rbe_run { "run", p }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("missing required var 'api'", 1, true))
    assert.are.same({}, lines("ran"))
    r = rbe_run { "run", p, "--var", "api=x" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "s" }, lines("ran"))
  end)

  it("unknown options are usage errors", function()
    local p = playbook("opt", nil, [[pb.step "s" { run = function() end },]])
    local r = rbe_run { "run", p, "--yse" }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("unknown option --yse", 1, true))
  end)
end)

describe("#playbook running", function()
  it("runs steps in order, passes results on, journals and reports", function()
    local p = playbook("ok", nil, [[
  pb.step "one" { run = function(ctx) mark("order", "one") return { n = 41 } end },
  pb.step "two" { run = function(ctx) mark("order", "two") return ctx.results.one.n + 1 end },
  pb.step "three" { run = function(ctx) mark("order", "three:" .. ctx.results.two) end },
]])
    local r = rbe_run { "run", p, "--reason", "INC-42 bad deploy", "--as", "alice" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "one", "two", "three:42" }, lines("order"))
    local id = run_id_of(r)
    assert.truthy(id)
    local evs = events(id)
    assert.are.equal("run_start", evs[1].ev)
    assert.are.equal("alice", evs[1].user)
    assert.are.equal("INC-42 bad deploy", evs[1].reason)
    assert.are.equal(rbe.sha256(fs.read(p)), evs[1].sha256)
    assert.are.equal("run_end", evs[#evs].ev)
    assert.are.equal(0, evs[#evs].exit_code)
    local report = fs.read(path("state/runs/" .. id .. "/report.md"))
    assert.truthy(report:find("Executed by | alice", 1, true))
    assert.truthy(report:find("INC-42 bad deploy", 1, true))
    assert.truthy(report:find("- [x] two (step): ok", 1, true))
  end)

  it("journal dir is 0700 and files 0600 whatever the umask", function()
    local p = playbook("modes", nil, [[pb.step "s" { run = function() end },]])
    local r = proc.run({ "sh", "-c", "umask 000; exec \"$0\" run \"$1\"", RBE, p },
      { cwd = dir, env = { RBE_STATE_DIR = path("state") }, check = false })
    assert.are.equal(0, r.code, r.stderr)
    local id = run_id_of(r)
    assert.are.equal(tonumber("700", 8), fs.stat(path("state")).mode)
    assert.are.equal(tonumber("700", 8), fs.stat(path("state/runs/" .. id)).mode)
    assert.are.equal(tonumber("600", 8), fs.stat(path("state/runs/" .. id .. "/journal.jsonl")).mode)
    assert.are.equal(tonumber("600", 8), fs.stat(path("state/runs/" .. id .. "/report.md")).mode)
  end)

  it("a failed step undoes completed steps in reverse order (exit 1), with results", function()
    local p = playbook("saga", nil, [[
  pb.step "a" { run = function() mark("log", "run a") return "A" end,
                undo = function(ctx) mark("log", "undo a " .. ctx.results.a) end },
  pb.step "b" { run = function() mark("log", "run b") end },
  pb.step "c" { run = function() mark("log", "run c") end, undo = function() mark("log", "undo c") end },
  pb.step "d" { run = function() error("d exploded") end, undo = function() mark("log", "undo d") end },
  pb.step "e" { run = function() mark("log", "run e") end },
]])
    local r = rbe_run { "run", p }
    assert.are.equal(1, r.code, r.stderr)
    assert.are.same({ "run a", "run b", "run c", "undo c", "undo a A" }, lines("log"))
    assert.truthy(r.stderr:find("d exploded", 1, true))
    local report = fs.read(path("state/runs/" .. run_id_of(r) .. "/report.md"))
    assert.truthy(report:find("Still in effect (it has no undo): b", 1, true), report)
    assert.truthy(report:find("Not run: e", 1, true))
  end)

  it("on_failure = stop skips the undo; continue goes on", function()
    local p = playbook("stop", nil, [[
  pb.step "a" { run = function() mark("log", "run a") end, undo = function() mark("log", "undo a") end },
  pb.step "b" { run = function() error("no") end, on_failure = "stop" },
  pb.step "c" { run = function() mark("log", "run c") end },
]])
    local r = rbe_run { "run", p }
    assert.are.equal(1, r.code)
    assert.are.same({ "run a" }, lines("log"))
    local p2 = playbook("cont", nil, [[
  pb.step "a" { run = function() mark("log2", "run a") end },
  pb.step "b" { run = function() error("tolerated") end, on_failure = "continue" },
  pb.step "c" { run = function() mark("log2", "run c") end },
]])
    r = rbe_run { "run", p2 }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "run a", "run c" }, lines("log2"))
    local report = fs.read(path("state/runs/" .. run_id_of(r) .. "/report.md"))
    assert.truthy(report:find("failed and was tolerated", 1, true))
  end)

  it("a failing undo stops the run with exit 3 and says which undo failed and what stays done", function()
    local p = playbook("undofail", nil, [[
  pb.step "a" { run = function() end, undo = function() mark("log", "undo a") end },
  pb.step "b" { run = function() end, undo = function() error("alias API down") end },
  pb.step "c" { run = function() end, undo = function() mark("log", "undo c") end },
  pb.step "d" { run = function() error("boom") end },
]])
    local r = rbe_run { "run", p }
    assert.are.equal(3, r.code, r.stderr)
    assert.are.same({ "undo c" }, lines("log"))
    assert.truthy(r.stderr:find("UNDO FAILED for 'b'", 1, true), r.stderr)
    local report = fs.read(path("state/runs/" .. run_id_of(r) .. "/report.md"))
    assert.truthy(report:find("Undo of **b** failed", 1, true), report)
    assert.truthy(report:find("Still done, not undone: a", 1, true), report)
  end)

  it("retries with backoff, then succeeds; attempts are journaled", function()
    local p = playbook("retry", nil, [[
  pb.step "flaky" { retries = 3, backoff = "20ms", run = function()
      mark("tries", "t")
      if count("tries", "t") < 3 then error("503 from the API") end
    end },
]])
    local r = rbe_run { "run", p }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(3, #lines("tries"))
    local evs = events(run_id_of(r))
    local fails, last = 0, nil
    for _, ev in ipairs(evs) do
      if ev.ev == "step_attempt_failed" then fails = fails + 1 end
      if ev.ev == "step_end" then last = ev end
    end
    assert.are.equal(2, fails)
    assert.are.equal(3, last.attempts)
  end)

  it("a step timeout cancels the step's wait", function()
    local p = playbook("timeout", nil, [[
  pb.step "slow" { timeout = "100ms", run = function() require("rbe.proc").run { "sleep", "20" } end },
]])
    local t0 = rbe.now()
    local r = rbe_run { "run", p }
    assert.are.equal(1, r.code)
    assert.is_true(rbe.now() - t0 < 10)
    assert.truthy(r.stderr:find("timed out after 0.1", 1, true), r.stderr)
  end)

  it("the run budget cancels a step that would overrun; budget_mode = warn goes on", function()
    local p = playbook("budget", [[budget = "300ms",]], [[
  pb.step "quick" { run = function() end, undo = function() mark("log", "undo quick") end },
  pb.step "long" { run = function() rbe.sleep(20) end },
]])
    local t0 = rbe.now()
    local r = rbe_run { "run", p }
    assert.are.equal(1, r.code)
    assert.is_true(rbe.now() - t0 < 10)
    assert.truthy(r.stderr:find("run budget of 300ms is used up", 1, true), r.stderr)
    assert.are.same({ "undo quick" }, lines("log"))
    local p2 = playbook("warn", [[budget = "100ms", budget_mode = "warn",]], [[
  pb.step "long" { run = function() rbe.sleep(0.3) end },
  pb.step "after" { run = function() mark("log2", "after") end },
]])
    r = rbe_run { "run", p2 }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "after" }, lines("log2"))
    assert.truthy(r.stderr:find("warning: run budget of 100ms is used up", 1, true), r.stderr)
  end)

  it("a phase budget applies to the phase's steps", function()
    local p = playbook("phase", [[budget = "1m",]], [[
  pb.phase "app" { budget = "200ms",
    pb.step "slow" { run = function() rbe.sleep(20) end },
  },
]])
    local r = rbe_run { "run", p }
    assert.are.equal(1, r.code)
    assert.truthy(r.stderr:find("phase 'app' budget of 200ms is used up", 1, true), r.stderr)
  end)

  it("parallel groups respect their limit; a failure cancels siblings, then undo runs", function()
    local p = playbook("par", nil, [[
  pb.step "before" { run = function() end, undo = function() mark("log", "undo before") end },
  pb.parallel { limit = 2,
    pb.step "p1" { run = function() mark("c", "+") rbe.sleep(0.1) mark("c", "-") end,
                   undo = function() mark("log", "undo p1") end },
    pb.step "p2" { run = function() mark("c", "+") rbe.sleep(0.1) mark("c", "-") end,
                   undo = function() mark("log", "undo p2") end },
    pb.step "p3" { run = function() mark("c", "+") rbe.sleep(0.1) mark("c", "-") end },
  },
  pb.parallel {
    pb.step "q1" { run = function() rbe.sleep(0.05) error("q1 failed") end },
    pb.step "q2" { run = function() rbe.sleep(20) mark("log", "q2 finished") end,
                   undo = function() mark("log", "undo q2") end },
  },
]])
    local t0 = rbe.now()
    local r = rbe_run { "run", p }
    assert.are.equal(1, r.code, r.stderr)
    assert.is_true(rbe.now() - t0 < 10)
    local depth, peak = 0, 0
    for _, s in ipairs(lines("c")) do
      depth = depth + (s == "+" and 1 or -1)
      peak = math.max(peak, depth)
    end
    assert.are.equal(2, peak)
    local log = lines("log")
    -- q2 was cancelled (never finished, never undone); p1/p2 and before undone
    assert.is_nil(table.concat(log, ","):find("q2", 1, true))
    assert.are.equal("undo before", log[#log])
    table.sort(log)
    assert.are.same({ "undo before", "undo p1", "undo p2" }, log)
  end)

  it("a gate passes after K passes in a row and fails at its deadline", function()
    local p = playbook("gate", nil, [[
  pb.gate "healthy" { every = "20ms", pass = 3, within = "5s", check = function()
      mark("polls", "p")
      local n = count("polls", "p")
      return n ~= 2  -- one failure breaks the streak
    end },
]])
    local r = rbe_run { "run", p }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(5, #lines("polls"))  -- pass, fail, pass, pass, pass
    local p2 = playbook("gate2", nil, [[
  pb.step "a" { run = function() end, undo = function() mark("log", "undo a") end },
  pb.gate "never" { every = "20ms", pass = 2, within = "150ms", check = function() return false end },
]])
    r = rbe_run { "run", p2 }
    assert.are.equal(1, r.code)
    assert.truthy(r.stderr:find("did not pass 2 time(s) in a row", 1, true), r.stderr)
    assert.are.same({ "undo a" }, lines("log"))
    local report = fs.read(path("state/runs/" .. run_id_of(r) .. "/report.md"))
    assert.truthy(report:find("never: FAILED", 1, true))
  end)

  it("when and check skip steps and record why", function()
    local p = playbook("skip", nil, [[
  pb.step "a" { when = function() return false end, run = function() mark("log", "a") end },
  pb.step "b" { check = function() return true end, run = function() mark("log", "b") end },
  pb.step "c" { run = function() mark("log", "c") end },
]])
    local r = rbe_run { "run", p }
    assert.are.equal(0, r.code)
    assert.are.same({ "c" }, lines("log"))
    local skips = {}
    for _, ev in ipairs(events(run_id_of(r))) do
      if ev.ev == "step_skip" then skips[ev.step] = ev.reason end
    end
    assert.are.equal("condition false", skips.a)
    assert.are.equal("already done (check)", skips.b)
  end)

  it("manual steps without a terminal and without --yes refuse to start", function()
    local p = playbook("manual", nil, [[
  pb.step "a" { run = function() mark("log", "a") end },
  pb.manual "post in the incident channel",
  pb.step "b" { confirm = "this drops the cache", run = function() mark("log", "b") end },
]])
    local r = rbe_run { "run", p }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("need an operator", 1, true))
    assert.truthy(r.stderr:find("post in the incident channel, b", 1, true))
    assert.are.same({}, lines("log"))
    r = rbe_run { "run", p, "--yes", "--as", "bob" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "a", "b" }, lines("log"))
    local confirms = 0
    for _, ev in ipairs(events(run_id_of(r))) do
      if ev.ev == "manual_confirm" then
        confirms = confirms + 1
        assert.are.equal("bob", ev.by)
        assert.is_true(ev.auto)
      end
    end
    assert.are.equal(2, confirms)
  end)

  it("vars come from --var, --var-file, the environment and defaults; secrets are masked everywhere", function()
    fs.write(path("vars.env"), "# comment\nregion = eu-west\n")
    local p = playbook("v", [[vars = {
      api = { default = "http://127.0.0.1:9" }, region = {}, mode = { env = "RBE_SPEC_MODE" },
      token = { env = "RBE_SPEC_TOKEN", secret = true, required = true } },]], [[
  pb.step "show" { run = function(ctx)
      mark("seen", ctx.vars.api .. " " .. ctx.vars.region .. " " .. ctx.vars.mode .. " " .. tostring(ctx.vars.token))
      mark("seen", rbe.reveal(ctx.vars.token))
      error("failed calling with token " .. rbe.reveal(ctx.vars.token))
    end },
]])
    local r = rbe_run({ "run", p, "--var-file", "vars.env", "--var", "api=http://127.0.0.1:8" },
      { env = { RBE_SPEC_MODE = "promote", RBE_SPEC_TOKEN = "tok-SECRET-123" } })
    assert.are.equal(1, r.code)
    assert.are.same({ "http://127.0.0.1:8 eu-west promote ***", "tok-SECRET-123" }, lines("seen"))
    assert.is_nil((r.stdout .. r.stderr):find("SECRET", 1, true))
    local id = run_id_of(r)
    assert.is_nil(fs.read(path("state/runs/" .. id .. "/journal.jsonl")):find("SECRET", 1, true))
    assert.is_nil(fs.read(path("state/runs/" .. id .. "/report.md")):find("SECRET", 1, true))
    assert.truthy(r.stderr:find("failed calling with token ***", 1, true))
  end)

  it("--json prints one JSON event per line, a version record first", function()
    local p = playbook("json", nil, [[pb.step "s" { run = function() return 1 end },]])
    local r = rbe_run { "run", p, "--json" }
    assert.are.equal(0, r.code)
    local evs = {}
    for l in r.stdout:gmatch("[^\n]+") do evs[#evs + 1] = cjson.decode(l) end
    assert.are.equal("version", evs[1].ev)
    assert.are.equal("run_start", evs[2].ev)
    assert.are.equal("run_end", evs[#evs].ev)
  end)

  it("plan prints the tree and each step's plan and writes nothing", function()
    local p = playbook("plan", [[budget = "15m", vars = { n = { default = "3" } },]], [[
  pb.phase "data" { budget = "5m",
    pb.step "flush" { run = function() mark("log", "ran") end, undo = function() end,
      plan = function(ctx) return ("would UNLINK %d keys"):format(tonumber(ctx.vars.n) * 1000) end },
    pb.parallel { limit = 2, pb.step "x" { run = function() end }, pb.step "y" { run = function() end } },
  },
  pb.gate "ok" { check = function() return true end, every = "5s", pass = 3, within = "2m" },
  pb.manual "tell the team",
]])
    local r = rbe_run { "plan", p, "--var", "n=48" }
    assert.are.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("phase data  [budget 5m]", 1, true), r.stdout)
    assert.truthy(r.stdout:find("step flush  [undo: yes]", 1, true))
    assert.truthy(r.stdout:find("    -> would UNLINK 48000 keys", 1, true), r.stdout)
    assert.truthy(r.stdout:find("parallel  [limit 2]", 1, true))
    assert.truthy(r.stdout:find("gate ok  [every 5s, 3 in a row, within 2m]", 1, true))
    assert.truthy(r.stdout:find("manual tell the team", 1, true))
    assert.are.same({}, lines("log"))
    assert.is_false(fs.exists(path("state")))
    r = rbe_run { "plan", p, "--json" }
    assert.are.equal(0, r.code)
    local doc = cjson.decode(r.stdout)
    assert.are.equal("plan", doc.ev)
    assert.are.equal("would UNLINK 3000 keys", doc.nodes[3].plan)
  end)

  it("history and show list and describe runs", function()
    local p = playbook("hist", nil, [[pb.step "s" { run = function() end },]])
    local r1 = rbe_run { "run", p, "--as", "carol" }
    local id = run_id_of(r1)
    local h = rbe_run { "history" }
    assert.are.equal(0, h.code)
    assert.truthy(h.stdout:find(id, 1, true))
    assert.truthy(h.stdout:find("carol", 1, true))
    assert.truthy(h.stdout:find("done", 1, true))
    local s = rbe_run { "show", id }
    assert.are.equal(0, s.code)
    assert.truthy(s.stdout:find("Rollback Execution Log", 1, true))
    assert.truthy(s.stdout:find("step_end", 1, true))
    assert.are.equal(2, rbe_run({ "show", "nope" }).code)
  end)

  it("help exit-codes lists them", function()
    local r = rbe_run { "help", "exit-codes" }
    assert.are.equal(0, r.code)
    for _, c in ipairs { "0 ", "1 ", "2 ", "3 ", "75 ", "130 " } do
      assert.truthy(r.stdout:find("  " .. c, 1, true), c)
    end
  end)
end)

describe("#playbook lock, crash and resume", function()
  -- a playbook whose step k announces that it is inside, then works
  local function crashy(name, extra)
    return playbook(name, nil, ([[
  pb.step "s1" { run = function() mark("inside", "1") rbe.sleep(0.3) mark("done", "1") end,
                 check = function() return count("done", "1") > 0 end %s },
  pb.step "s2" { run = function() mark("inside", "2") rbe.sleep(0.3) mark("done", "2") end,
                 check = function() return count("done", "2") > 0 end %s },
  pb.step "s3" { run = function() mark("inside", "3") rbe.sleep(0.3) mark("done", "3") end,
                 check = function() return count("done", "3") > 0 end %s },
  pb.step "s4" { run = function() mark("inside", "4") rbe.sleep(0.3) mark("done", "4") end,
                 check = function() return count("done", "4") > 0 end %s },
]]):format(extra or "", extra or "", extra or "", extra or ""))
  end

  -- start `rbe run`, wait until step k is inside its run, kill -9 it
  local function run_and_kill(p, k, sig)
    local child = proc.spawn({ RBE, "run", p }, { cwd = dir, check = false,
      env = { RBE_STATE_DIR = path("state"), NO_COLOR = "1" } })
    rbe.timeout("20s", function()
      while not fs.exists(path("inside")) or not fs.read(path("inside")):find(tostring(k), 1, true) do
        rbe.sleep(0.01)
      end
    end)
    child:kill(sig or "SIGKILL")
    local res = child:wait()
    child:close()
    return res
  end

  it("SIGKILL in step k, then resume: every step ran exactly once (k = 1..4)", function()
    for k = 1, 4 do
      if fs.exists(path("inside")) then fs.remove(path("inside")) end
      if fs.exists(path("done")) then fs.remove(path("done")) end
      if fs.exists(path("state")) then fs.remove(path("state"), { recursive = true }) end
      local p = crashy("crash" .. k)
      local res = run_and_kill(p, k)
      assert.are.equal("SIGKILL", res.signal)
      local id = runs()[1]
      local r = rbe_run { "resume", id }
      assert.are.equal(0, r.code, r.stderr)
      local done = lines("done")
      table.sort(done)
      assert.are.same({ "1", "2", "3", "4" }, done, "k=" .. k)
      -- steps finished before the kill were not run again
      local inside = lines("inside")
      for s = 1, k - 1 do
        local n = 0
        for _, x in ipairs(inside) do if x == tostring(s) then n = n + 1 end end
        assert.are.equal(1, n, "step " .. s .. " entered once, k=" .. k)
      end
    end
  end)

  it("an in-flight step without check or idempotent needs a decision", function()
    local p = playbook("nocheck", nil, [[
  pb.step "s1" { run = function() mark("inside", "1") rbe.sleep(0.3) mark("done", "1") end },
  pb.step "s2" { run = function() mark("done", "2") end },
]])
    run_and_kill(p, 1)
    local id = runs()[1]
    local r = rbe_run { "resume", id }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("--rerun-unknown or --skip-unknown", 1, true))
    r = rbe_run { "resume", id, "--skip-unknown" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "2" }, lines("done"))
  end)

  it("the lock stops a second run (exit 75, says who) and is released after SIGKILL", function()
    local p = crashy("locked")
    local child = proc.spawn({ RBE, "run", p, "--as", "dave" }, { cwd = dir, check = false,
      env = { RBE_STATE_DIR = path("state"), NO_COLOR = "1" } })
    rbe.timeout("20s", function() while not fs.exists(path("inside")) do rbe.sleep(0.01) end end)
    local r = rbe_run { "run", p }
    assert.are.equal(75, r.code)
    assert.truthy(r.stderr:find("is being run by dave@", 1, true), r.stderr)
    child:kill("SIGKILL")
    child:wait()
    child:close()
    r = rbe_run { "run", p }
    assert.are.equal(0, r.code, r.stderr)
  end)

  it("a journal torn mid-line still resumes", function()
    local p = crashy("torn")
    run_and_kill(p, 2)
    local id = runs()[1]
    local jp = path("state/runs/" .. id .. "/journal.jsonl")
    local text = fs.read(jp)
    fs.write(jp, text .. '{"ev":"step_end","step":"s2","sta', { mode = "0600" })
    local r = rbe_run { "resume", id }
    assert.are.equal(0, r.code, r.stderr)
    assert.truthy(r.stderr:find("torn", 1, true))
    local done = lines("done")
    table.sort(done)
    assert.are.same({ "1", "2", "3", "4" }, done)
  end)

  it("resume refuses a changed playbook (unless --force) and an unsafe journal", function()
    local p = crashy("changed")
    run_and_kill(p, 2)
    local id = runs()[1]
    fs.append(p, "\n-- edited\n")
    local r = rbe_run { "resume", id }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("changed since run", 1, true))
    fs.chmod(path("state/runs/" .. id .. "/journal.jsonl"), "0666")
    r = rbe_run { "resume", id, "--force" }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("group- or world-writable", 1, true), r.stderr)
    fs.chmod(path("state/runs/" .. id .. "/journal.jsonl"), "0600")
    r = rbe_run { "resume", id, "--force" }
    assert.are.equal(0, r.code, r.stderr)
  end)

  it("Ctrl-C cancels the running step, journals it, exits 130, and resume finishes", function()
    local p = crashy("sigint")
    local res = run_and_kill(p, 2, "SIGINT")
    assert.are.equal(130, res.code, res.stderr)
    assert.truthy(res.stderr:find("rbe resume", 1, true))
    local id = runs()[1]
    local saw = false
    for _, ev in ipairs(events(id)) do if ev.ev == "interrupted" then saw = true end end
    assert.is_true(saw)
    local r = rbe_run { "resume", id }
    assert.are.equal(0, r.code, r.stderr)
    local done = lines("done")
    table.sort(done)
    assert.are.same({ "1", "2", "3", "4" }, done)
    assert.are.equal(2, rbe_run({ "resume", id }).code) -- finished runs are not resumed
  end)
end)

describe("#playbook on a terminal", function()
  local has_tmux = proc.run({ "sh", "-c", "command -v tmux" }, { check = false }).code == 0
  local sock

  local function tmux(...)
    return proc.run({ "tmux", "-L", sock, ... }, { check = false, timeout = "10s" })
  end
  local function screen() return tmux("capture-pane", "-p", "-t", "t").stdout end
  local function wait_for(text, secs)
    local s
    local ok = rbe.try(rbe.timeout, secs or 10, function()
      while true do
        s = screen()
        if s:find(text, 1, true) then return end
        rbe.sleep(0.05)
      end
    end)
    return ok, s
  end

  after_each(function() if sock then tmux("kill-server") end end)

  it("shows live progress, asks the operator and journals who confirmed", function()
    if not has_tmux then pending("tmux is not installed") return end
    sock = "rbe-spec-" .. rbe.whoami().pid
    local p = playbook("tty", [[budget = "1m",]], [[
  pb.step "warm up" { run = function() rbe.sleep(1.5) end },
  pb.manual "post in the incident channel",
  pb.step "drop cache" { confirm = "this drops the cache", run = function() mark("log", "dropped") end },
]])
    local cmd = ("cd %s && RBE_STATE_DIR=%s %s run %s --as erin; echo EXIT=$?; sleep 30")
      :format(dir, path("state"), RBE, p)
    tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "30", "sh", "-c", cmd)
    local ok, s = wait_for("[1/3] warm up")
    assert.is_true(ok, s)
    assert.truthy(s:find("budget", 1, true), s)       -- the live line shows the budget used
    ok, s = wait_for("type 'done' when it is done")
    assert.is_true(ok, s)
    tmux("send-keys", "-t", "t", "done", "Enter")
    ok, s = wait_for("proceed with 'drop cache'? [y/N]")
    assert.is_true(ok, s)
    tmux("send-keys", "-t", "t", "y", "Enter")
    ok, s = wait_for("EXIT=0")
    assert.is_true(ok, s)
    assert.are.same({ "dropped" }, lines("log"))
    local by = {}
    for _, ev in ipairs(events(runs()[1])) do
      if ev.ev == "manual_confirm" then by[#by + 1] = ev.by .. ":" .. tostring(ev.auto) end
    end
    assert.are.same({ "erin:false", "erin:false" }, by)
  end)
end)
