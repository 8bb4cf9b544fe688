-- `rbe watch FILE` (lua/rbe/watch.lua) end to end: real `rbe watch`
-- children on small playbooks with a trigger, checked through exit codes,
-- output, the cooldown record, journals and reports: firing after N
-- consecutive checks, the evidence in the journal and report, at most one
-- run per cooldown (also across restarts of the watcher), check errors
-- and unknown health results never firing, validation of the trigger, one
-- watcher per playbook, Ctrl-C, --dry-run and --json, secrets masked, and
-- a real health.error_rate trigger on a log that goes bad.
local rbe = require "rbe"
local json = require "rbe.json"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local support = require "support"

local RBE = support.rbe_bin()

local tmp

local function playbook(name, trigger, steps, extra)
  local p = tmp .. "/" .. name .. ".lua"
  fs.write(p, ([[
local pb = require "rbe.playbook"
local fs = require "rbe.fs"
local health = require "health"
local D = %q
local function mark(s) fs.append(D .. "/marks", s .. "\n") end
return pb.playbook %q {
  vars = { token = { default = "tok-SECRET-4242", secret = true } },
  %s
  trigger = %s,
  %s
}
]]):format(tmp, name, extra or "", trigger, steps or [[pb.step "roll back" { run = function(ctx) mark("ran") return "rolled back" end },]]))
  return p
end

local function watch(args, opts)
  local argv = { RBE, "watch" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  argv[#argv + 1] = "--state-dir"
  argv[#argv + 1] = tmp .. "/state"
  return proc.run(argv, { check = false, timeout = (opts or {}).timeout or "60s",
    env = { NO_COLOR = "1" } })
end

local function marks()
  local ok, t = pcall(fs.read, tmp .. "/marks")
  local out = {}
  if ok then for l in t:gmatch("[^\n]+") do out[#out + 1] = l end end
  return out
end

local function runs()
  local d = tmp .. "/state/runs"
  return fs.exists(d) and fs.list(d) or {}
end

local function events(id)
  local out = {}
  for l in fs.lines(tmp .. "/state/runs/" .. id .. "/journal.jsonl") do out[#out + 1] = json.decode(l) end
  return out
end

before_each(function() tmp = fs.tmpdir("rbe-watch-") end)
after_each(function() fs.remove(tmp, { recursive = true }) end)

describe("#watch firing", function()
  it("runs the playbook after `times` consecutive firings, with the evidence journaled and reported", function()
    local p = playbook("fires", [[{ every = "20ms", times = 2, cooldown = "1h",
    check = function(ctx) return ctx.check >= 3, { reason = "error rate " .. (ctx.check * 3) .. "% > 5%", n = ctx.check } end }]])
    local r = watch { p, "--once" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "ran" }, marks())
    assert.truthy(r.stderr:find("check 2: quiet: error rate 6% > 5%", 1, true), r.stderr)
    assert.truthy(r.stderr:find("check 3: fired (1/2): error rate 9% > 5%", 1, true), r.stderr)
    assert.truthy(r.stderr:find("check 4: fired (2/2): error rate 12% > 5%", 1, true), r.stderr)
    local ids = runs()
    assert.are.equal(1, #ids)
    local evs = events(ids[1])
    assert.are.equal("run_start", evs[1].ev)
    assert.are.equal("rbe watch: trigger fired: error rate 12% > 5%", evs[1].reason)
    assert.are.equal("trigger", evs[2].ev)
    local t = evs[2].trigger
    assert.are.equal("error rate 12% > 5%", t.reason)
    assert.are.equal("every 20ms, 2 in a row, cooldown 1h00m", t.description)
    assert.are.equal(2, #t.checks)
    assert.are.equal(3, t.checks[1].evidence.n)
    assert.are.equal(4, t.checks[2].evidence.n)
    assert.truthy(t.fired_at:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$"))
    local report = fs.read(tmp .. "/state/runs/" .. ids[1] .. "/report.md")
    assert.truthy(report:find("## Trigger\n\n- Fired at ", 1, true), report)
    assert.truthy(report:find("- Evidence: error rate 12% > 5%\n", 1, true), report)
    assert.truthy(report:find("- Check 1 at .-: error rate 9%% > 5%%\n"), report)
    assert.truthy(report:find("- Check 2 at .-: error rate 12%% > 5%%\n"), report)
  end)

  it("firings that are not consecutive never run it", function()
    local p = playbook("flappy", [[{ every = "10ms", times = 2, cooldown = "1h",
    check = function(ctx) return ctx.check % 2 == 0, "flap " .. ctx.check end }]])
    local r = watch { p, "--max-checks", "12" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({}, marks())
    assert.are.same({}, runs())
    assert.truthy(r.stderr:find("check 12: fired (1/2): flap 12", 1, true), r.stderr)
    assert.truthy(r.stderr:find("stopping after 12 checks", 1, true))
  end)

  it("a check that raises resets the streak and never fires", function()
    local p = playbook("broken", [[{ every = "10ms", times = 2, cooldown = "1h",
    check = function(ctx) if ctx.check % 2 == 1 then error("prometheus down") end return true, "bad" end }]])
    local r = watch { p, "--max-checks", "8" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({}, runs())
    assert.truthy(r.stderr:find("check 3 failed (counts as not fired): lua: ", 1, true), r.stderr)
    assert.truthy(r.stderr:find("broken.lua:10: prometheus down", 1, true), r.stderr)
  end)

  it("a run that fails gives its exit code with --once", function()
    local p = playbook("failing", [[{ every = "10ms", times = 1, cooldown = "1h",
    check = function(ctx) return true, { reason = "down" } end }]],
      [[pb.step "a" { run = function() mark("a") end, undo = function() mark("undo a") end },
  pb.step "b" { run = function() error("still broken") end },]])
    local r = watch { p, "--once" }
    assert.are.equal(1, r.code, r.stderr)
    assert.are.same({ "a", "undo a" }, marks())
    assert.truthy(r.stderr:find("ended with exit 1", 1, true), r.stderr)
  end)
end)

describe("#watch cooldown", function()
  it("runs at most once per cooldown, also across restarts of the watcher", function()
    local p = playbook("cool", [[{ every = "10ms", times = 1, cooldown = "1h",
    check = function(ctx) return true, { reason = "error rate 50%" } end }]])
    local r = watch { p, "--max-checks", "5" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "ran" }, marks())
    local first = runs()[1]
    assert.truthy(r.stderr:find("trigger fired, but run " .. first .. " started at ", 1, true), r.stderr)
    assert.truthy(r.stderr:find(": in cooldown until ", 1, true), r.stderr)
    -- a new watcher remembers the cooldown (state dir)
    local r2 = watch { p, "--max-checks", "3" }
    assert.are.equal(0, r2.code, r2.stderr)
    assert.are.same({ "ran" }, marks())
    assert.are.equal(1, #runs())
    assert.truthy(r2.stderr:find("in cooldown until", 1, true), r2.stderr)
    local key_files = fs.list(tmp .. "/state/watch")
    assert.are.equal(1, #key_files)
    local st = json.decode(fs.read(tmp .. "/state/watch/" .. key_files[1]))
    assert.are.equal(first, st.last_run_id)
    assert.are.equal(0, st.last_exit_code)
    assert.are.equal("0600", ("%04o"):format(fs.stat(tmp .. "/state/watch/" .. key_files[1]).mode))
    -- once the cooldown is over it may run again
    st.last_fired = st.last_fired - 3601
    fs.write(tmp .. "/state/watch/" .. key_files[1], json.encode(st))
    local r3 = watch { p, "--once" }
    assert.are.equal(0, r3.code, r3.stderr)
    assert.are.same({ "ran", "ran" }, marks())
  end)
end)

describe("#watch usage", function()
  it("refuses a playbook without a trigger or with a bad one (exit 2, file:line)", function()
    local cases = {
      { "nil", "has no trigger" },
      { [[{ check = function() end, evry = "1s" }]], "trigger: unknown field 'evry' (did you mean 'every'?)" },
      { [[{ check = "error rate" }]], "trigger: check must be a function" },
      { [[{ check = function() end, every = "soon" }]], "trigger: field 'every'" },
      { [[{ check = function() end, times = 0 }]], "trigger: times must be a positive integer" },
    }
    for i, c in ipairs(cases) do
      local p = playbook("bad" .. i, c[1])
      local r = watch { p, "--once" }
      assert.are.equal(2, r.code, c[1])
      assert.truthy(r.stderr:find(c[2], 1, true), r.stderr)
      assert.truthy(r.stderr:find("bad" .. i .. ".lua:%d+"), r.stderr)
    end
    local r = watch { tmp .. "/missing.lua" }
    assert.are.equal(2, r.code)
    r = watch { "--frobnicate" }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("unknown option --frobnicate", 1, true))
    r = proc.run({ RBE, "watch", "--help" }, { check = false })
    assert.are.equal(0, r.code)
    assert.truthy(r.stdout:find("usage: rbe watch FILE", 1, true))
  end)

  it("manual steps without a terminal need --yes, before any check", function()
    local p = playbook("manual", [[{ every = "10ms", check = function() return true, "x" end }]],
      [[pb.manual "tell the incident channel",]])
    local r = watch { p, "--once" }
    assert.are.equal(2, r.code)
    assert.truthy(r.stderr:find("pass --yes", 1, true), r.stderr)
    assert.falsy(r.stderr:find("check 1", 1, true))
    r = watch { p, "--once", "--yes" }
    assert.are.equal(0, r.code, r.stderr)
  end)

  it("one watcher per playbook; Ctrl-C stops a watcher with 130", function()
    local p = playbook("held", [[{ every = "50ms", check = function() return false, "quiet" end }]])
    local w <close> = proc.spawn({ RBE, "watch", p, "--state-dir", tmp .. "/state" },
      { stderr = "pipe", stdout = "null", check = false })
    for line in w:lines("stderr") do
      if line:find("check 1:", 1, true) then break end
    end
    local r = watch { p, "--once" }
    assert.are.equal(75, r.code)
    assert.truthy(r.stderr:find("is already watched by ", 1, true), r.stderr)
    assert.truthy(r.stderr:find("(pid " .. w.pid .. ")", 1, true), r.stderr)
    w:kill("SIGINT")
    local res = w:wait()
    assert.are.equal(130, res.code)
  end)

  it("--dry-run runs nothing; --json prints watch events", function()
    local p = playbook("dry", [[{ every = "10ms", times = 2, cooldown = "1h",
    check = function(ctx) return true, { reason = "bad " .. ctx.check } end }]])
    local r = watch { p, "--dry-run", "--once", "--json" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({}, marks())
    assert.are.same({}, runs())
    local evs = {}
    for l in r.stdout:gmatch("[^\n]+") do evs[#evs + 1] = json.decode(l) end
    assert.are.equal("watch_start", evs[1].ev)
    assert.are.equal("watch_check", evs[2].ev)
    assert.is_true(evs[2].fired)
    assert.are.equal("watch_dry_run", evs[#evs].ev)
    assert.are.equal("bad 2", evs[#evs].evidence.reason)
  end)
end)

describe("#watch secrets and real checks", function()
  it("secret vars in evidence are masked in the output, journal and report", function()
    local p = playbook("secret", [[{ every = "10ms", times = 1,
    check = function(ctx) return true, { reason = "token " .. rbe.reveal(ctx.vars.token) .. " rejected" } end }]])
    local r = watch { p, "--once" }
    assert.are.equal(0, r.code, r.stderr)
    local id = runs()[1]
    local journal = fs.read(tmp .. "/state/runs/" .. id .. "/journal.jsonl")
    local report = fs.read(tmp .. "/state/runs/" .. id .. "/report.md")
    for _, text in ipairs { r.stderr, r.stdout, journal, report } do
      assert.falsy(text:find("tok-SECRET-4242", 1, true))
    end
    assert.truthy(report:find("Evidence: token *** rejected", 1, true), report)
  end)

  it("health.error_rate on a log that goes bad fires after two checks; unknown never fires", function()
    local log = tmp .. "/app.log"
    local p = playbook("errors", ([[{ every = "50ms", times = 2, cooldown = "30m",
    check = function(ctx)
      return health.failed(health.error_rate { log = %q, window = "5m", max = 0.05 })
    end }]]):format(log))
    -- no log yet: unknown for every check, never fires
    local r = watch { p, "--max-checks", "3" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({}, runs())
    assert.truthy(r.stderr:find("quiet: cannot read the log", 1, true), r.stderr)
    -- 100 lines of the last minutes, 12 of them errors
    local lines = {}
    local now = os.time()
    for i = 1, 100 do
      lines[i] = ("%s %s [drill-app v2] request %d\n"):format(
        os.date("!%Y-%m-%dT%H:%M:%SZ", now - 120 + i), i % 8 == 0 and "ERROR" or "INFO", i)
    end
    fs.write(log, table.concat(lines))
    r = watch { p, "--once" }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "ran" }, marks())
    local evs = events(runs()[1])
    local t = evs[2].trigger
    assert.are.equal("error rate 12% (12 of 100 lines in 300s) > 5%", t.reason)
    assert.are.equal(12, t.checks[1].evidence.errors)
    assert.are.equal(100, t.checks[2].evidence.total)
  end)
end)
