-- modules/notify.lua against a local recording endpoint
-- (tests/fixtures/recorder.js): Slack webhooks (text + blocks), PagerDuty
-- Events API v2 (trigger / resolve with a dedup key, change events, an
-- invalid event), generic webhooks, the runbooks' three messages, the
-- step builder (a failing notification is journaled and does not fail the
-- run unless required) and the playbook's notify field through `rbe run`.
-- Secrets (webhook URLs, routing keys) never reach errors, journals or
-- reports.
local rbe = require "rbe"
local http = require "rbe.http"
local json = require "rbe.json"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local support = require "support"
local notify = require "notify"

local RBE = support.rbe_bin()

local srv, base, tmp
local SLACK_PATH = "/slack/T000/B000/XXXXsecretXXXX"
local KEY = "R0UT1NGKEYR0UT1NGKEYR0UT1NGKEY32"   -- 32 characters, a secret

local function requests(prefix)
  return http.get(base .. "/_requests", { query = { path = prefix } }):json().requests
end

local function respond(rule) srv:respond(rule) end

setup(function()
  srv = support.recorder()
  base = srv.base
end)

teardown(function()
  if srv then srv:close() end
end)

before_each(function()
  srv:reset()
  tmp = fs.tmpdir("rbe-notify-")
end)

after_each(function()
  if tmp then fs.remove(tmp, { recursive = true }) end
end)

describe("#notify senders", function()
  it("posts text and blocks to a Slack incoming webhook", function()
    local msg = notify.message("started", { playbook = "phase 2", reason = "INC-42 error rate",
      user = "alice", host = "ops1", run_id = "20240101-000000-abcdef", budget = 900 })
    local r = notify.slack { webhook = base .. SLACK_PATH, text = msg.text, blocks = msg.blocks }
    assert.are.equal(200, r.status)
    local got = requests("/slack/")
    assert.are.equal(1, #got)
    assert.are.equal("POST", got[1].method)
    assert.are.equal("application/json", got[1].headers["content-type"])
    local body = got[1].json
    assert.truthy(body.text:find("Rollback started:* phase 2", 1, true), body.text)
    assert.truthy(body.text:find("*Reason:* INC-42 error rate", 1, true), body.text)
    assert.truthy(body.text:find("*Budget:* 15m00s", 1, true), body.text)
    assert.are.equal("header", body.blocks[1].type)
    assert.are.equal("Rollback started: phase 2", body.blocks[1].text.text)
    assert.are.equal("section", body.blocks[2].type)
    assert.are.equal("context", body.blocks[#body.blocks].type)
    assert.truthy(body.blocks[#body.blocks].elements[1].text:find("20240101-000000-abcdef", 1, true))
  end)

  it("raises a notify error for a refused webhook, without the webhook's URL", function()
    respond { path = "/slack/*", status = 404, body = "no_service" }
    local err = support.raises(notify.slack, { webhook = base .. SLACK_PATH, text = "x" })
    assert.are.equal("notify", err.kind)
    assert.are.equal(404, err.code)
    assert.are.equal("slack", err.target)
    assert.truthy(tostring(err):find("HTTP 404 no_service", 1, true), tostring(err))
    assert.falsy(tostring(err):find("secret", 1, true), tostring(err))
    -- a connection failure names neither
    local err2 = support.raises(notify.slack, { webhook = "http://127.0.0.1:1/slack/T/B/topsecret",
      text = "x", retries = 0 })
    assert.are.equal("notify", err2.kind)
    assert.are.equal("CURLE_COULDNT_CONNECT", err2.code)
    assert.falsy(tostring(err2):find("topsecret", 1, true), tostring(err2))
  end)

  it("retries a webhook that answers 503 once", function()
    respond { path = "/slack/*", status = 503, body = "service_unavailable", times = 1 }
    local r = notify.slack { webhook = base .. SLACK_PATH, text = "retried" }
    assert.are.equal(200, r.status)
    local got = requests("/slack/")
    assert.are.equal(2, #got)
    assert.are.equal(503, got[1].status)
    assert.are.equal(200, got[2].status)
  end)

  it("triggers and resolves a PagerDuty alert under one dedup key", function()
    local t = notify.pagerduty { url = base, routing_key = KEY, summary = "Rollback started: web",
      source = "ops1", severity = "warning", dedup_key = "rbe-run-1",
      custom_details = { run_id = "run-1" }, links = { { href = "https://x/report", text = "report" } } }
    assert.are.equal(202, t.status)
    assert.are.equal("rbe-run-1", t.dedup_key)
    local r = notify.pagerduty { url = base, routing_key = KEY, action = "resolve", dedup_key = "rbe-run-1" }
    assert.are.equal("resolve", r.action)
    local got = requests("/v2/enqueue")
    assert.are.equal(2, #got)
    local e1, e2 = got[1].json, got[2].json
    assert.are.equal(KEY, e1.routing_key)
    assert.are.equal("trigger", e1.event_action)
    assert.are.equal("rbe-run-1", e1.dedup_key)
    assert.are.equal("Rollback started: web", e1.payload.summary)
    assert.are.equal("warning", e1.payload.severity)
    assert.are.equal("ops1", e1.payload.source)
    assert.are.equal("run-1", e1.payload.custom_details.run_id)
    assert.are.equal("https://x/report", e1.links[1].href)
    assert.truthy(e1.payload.timestamp:match("^%d%d%d%d%-%d%d%-%d%dT"))
    assert.are.equal("resolve", e2.event_action)
    assert.are.equal("rbe-run-1", e2.dedup_key)
    assert.is_nil(e2.payload)
  end)

  it("an invalid PagerDuty event is a notify error that hides the routing key", function()
    local err = support.raises(notify.pagerduty, { url = base, routing_key = "short-key-0123",
      summary = "x" })
    assert.are.equal("notify", err.kind)
    assert.are.equal(400, err.code)
    assert.truthy(tostring(err):find("invalid event", 1, true), tostring(err))
    assert.falsy(tostring(err):find("short-key-0123", 1, true), tostring(err))
    -- misuse is a plain error before anything is sent
    assert.truthy(tostring(support.raises(notify.pagerduty, { url = base, routing_key = KEY,
      action = "resolve" })):find("needs the dedup_key", 1, true))
    assert.truthy(tostring(support.raises(notify.pagerduty, { url = base, routing_key = KEY,
      summary = "x", severity = "urgent" })):find("severity must be", 1, true))
    assert.are.equal(1, #requests("/v2/enqueue"))
  end)

  it("sends PagerDuty change events", function()
    local r = notify.pagerduty_change { url = base, routing_key = KEY,
      summary = "Rolled web back to v1", source = "rbe", custom_details = { from = "v2", to = "v1" } }
    assert.are.equal(202, r.status)
    local got = requests("/v2/change/enqueue")
    assert.are.equal(1, #got)
    assert.are.equal("Rolled web back to v1", got[1].json.payload.summary)
    assert.are.equal("v1", got[1].json.payload.custom_details.to)
    assert.are.equal(KEY, got[1].json.routing_key)
  end)

  it("posts JSON to a generic webhook with its headers; a non-2xx raises", function()
    local r = notify.webhook { url = base .. "/hook", json = { event = "x", n = 1 },
      headers = { ["X-Token"] = rbe.secret("hook-token-123") } }
    assert.are.equal(200, r.status)
    local got = requests("/hook")
    assert.are.equal(1, got[1].json.n)
    assert.are.equal("hook-token-123", got[1].headers["x-token"])
    respond { path = "/hook", status = 500, body = { error = "down, token hook-token-123" } }
    local err = support.raises(notify.webhook, { url = base .. "/hook", json = {}, retries = 0,
      headers = { ["X-Token"] = rbe.secret("hook-token-123") } })
    assert.are.equal(500, err.code)
    assert.falsy(tostring(err):find("hook-token-123", 1, true), tostring(err))
  end)
end)

describe("#notify messages", function()
  it("fills the runbooks' three messages from a run", function()
    local info = { playbook = "phase 2", reason = "INC-7", user = "bob", host = "h", run_id = "r1",
      phase = "application", elapsed = 125, budget = 900, steps_done = 3, steps_total = 7,
      result = "failed, undone", report = "/state/runs/r1/report.md", step = "promote",
      error = "vercel: promote failed\nsecond line" }
    local s = notify.message("started", info)
    assert.are.equal("started", s.kind)
    assert.truthy(s.summary:find("^Rollback started: phase 2; reason: INC%-7"))
    local p = notify.message("progress", info)
    assert.truthy(p.text:find("*Phase:* application done", 1, true), p.text)
    assert.truthy(p.text:find("*Steps:* 3 of 7", 1, true), p.text)
    assert.truthy(p.text:find("*Elapsed:* 2m05s of 15m00s", 1, true), p.text)
    local d = notify.message("done", info)
    assert.truthy(d.text:find("*Report:* /state/runs/r1/report.md", 1, true))
    assert.falsy(d.text:find("Failed step", 1, true))
    local f = notify.message("failed", info)
    assert.truthy(f.text:find(":x: *Rollback FAILED:* phase 2", 1, true), f.text)
    assert.truthy(f.text:find("*Failed step:* promote", 1, true))
    assert.truthy(f.text:find("*Error:* vercel: promote failed second line", 1, true), f.text)
    assert.are.equal("failed, undone", f.fields.result)
    assert.truthy(tostring(support.raises(notify.message, "finished", info)):find("kind must be", 1, true))
  end)
end)

-- a playbook using the notify module, run with `rbe run`
local function playbook(name, body)
  local p = tmp .. "/" .. name .. ".lua"
  fs.write(p, ([[
local pb = require "rbe.playbook"
local notify = require "notify"
local fs = require "rbe.fs"
local BASE = %q
return pb.playbook %q {
  vars = { slack = { env = "TEST_SLACK_URL", secret = true }, pd_key = { env = "TEST_PD_KEY", secret = true } },
%s
}
]]):format(base, name, body))
  return p
end

local function rbe_run(p, args)
  local argv = { RBE, "run", p, "--state-dir", tmp .. "/state", "--reason", "INC-9" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  return proc.run(argv, { check = false, timeout = "60s", env = { NO_COLOR = "1",
    TEST_SLACK_URL = base .. SLACK_PATH, TEST_PD_KEY = KEY } })
end

local function run_files(r)
  local id = (r.stderr .. r.stdout):match("run (%d+%-%d+%-%x+)")
  assert(id, r.stderr)
  local dir = tmp .. "/state/runs/" .. id
  local events = {}
  local text = fs.read(dir .. "/journal.jsonl")
  for l in text:gmatch("[^\n]+") do events[#events + 1] = json.decode(l) end
  return events, text, fs.read(dir .. "/report.md"), id
end

describe("#notify in playbooks", function()
  it("a failing notification step is journaled and the run goes on", function()
    respond { path = "/slack/*", status = 500, body = "internal_error" }
    local p = playbook("soft", [[
  pb.step "tell slack" (notify.step { message = "started", slack = { webhook = function(ctx) return ctx.vars.slack end, retries = 0 } }),
  pb.step "work" { run = function(ctx) fs.write(ctx.run_dir .. "/worked", "yes") return "ok" end },
]])
    local r = rbe_run(p)
    assert.are.equal(0, r.code, r.stderr)
    local events, text, report = run_files(r)
    local logged, result
    for _, ev in ipairs(events) do
      if ev.ev == "log" and ev.step == "tell slack" then logged = ev.message end
      if ev.ev == "step_end" and ev.step == "tell slack" then result = ev.result end
    end
    assert.truthy(logged and logged:find("notification to slack failed: notify: slack: HTTP 500", 1, true), logged)
    assert.is_false(result[1].ok)
    assert.are.equal("slack", result[1].target)
    assert.falsy(text:find("secret", 1, true))
    assert.falsy(report:find("secret", 1, true))
    assert.are.equal(1, #requests("/slack/"))
  end)

  it("a required notification that fails fails its step (and undo runs)", function()
    local p = playbook("hard", [[
  pb.step "prepare" { run = function(ctx) return "x" end, undo = function(ctx) fs.write(ctx.run_dir .. "/undone", "yes") end },
  pb.step "page" (notify.step { message = "started", required = true,
    pagerduty = { url = BASE, routing_key = "not-32-chars-secret-key" } }),
]])
    local r = rbe_run(p)
    assert.are.equal(1, r.code, r.stderr)
    local events, text, report, id = run_files(r)
    assert.truthy(fs.exists(tmp .. "/state/runs/" .. id .. "/undone"))
    local failed
    for _, ev in ipairs(events) do
      if ev.ev == "step_end" and ev.step == "page" then failed = ev end
    end
    assert.are.equal("failed", failed.status)
    assert.truthy(failed.error:find("required notification failed", 1, true), failed.error)
    assert.falsy(text:find("not-32-chars-secret-key", 1, true))
    assert.falsy(report:find("not-32-chars-secret-key", 1, true))
  end)

  it("the playbook's notify field sends started, progress and done, journaled", function()
    local p = playbook("lifecycle", [[
  budget = "5m",
  notify = notify.on_run {
    slack = { webhook = function(ctx) return ctx.vars.slack end },
    pagerduty = { url = BASE, routing_key = function(ctx) return ctx.vars.pd_key end },
    webhook = { url = BASE .. "/hook" },
  },
  pb.phase "one" { pb.step "a" { run = function() return 1 end } },
  pb.phase "two" { pb.step "b" { run = function() return 2 end } },
]])
    local r = rbe_run(p)
    assert.are.equal(0, r.code, r.stderr)
    local events, text, report, id = run_files(r)
    local slack = requests("/slack/")
    local kinds = {}
    for _, q in ipairs(slack) do kinds[#kinds + 1] = q.json.blocks[1].text.text end
    assert.are.same({ "Rollback started: lifecycle", "Rollback in progress: lifecycle",
      "Rollback in progress: lifecycle", "Rollback done: lifecycle" }, kinds)
    assert.truthy(slack[1].json.text:find("*Reason:* INC-9", 1, true))
    assert.truthy(slack[2].json.text:find("*Phase:* one done", 1, true), slack[2].json.text)
    assert.truthy(slack[4].json.text:find("*Report:* " .. tmp .. "/state/runs/" .. id .. "/report.md", 1, true),
      slack[4].json.text)
    local pd = requests("/v2/enqueue")
    assert.are.equal(2, #pd)   -- trigger at the start, resolve at the end (no progress)
    assert.are.equal("trigger", pd[1].json.event_action)
    assert.are.equal("rbe-" .. id, pd[1].json.dedup_key)
    assert.are.equal("resolve", pd[2].json.event_action)
    assert.are.equal("rbe-" .. id, pd[2].json.dedup_key)
    local hook = requests("/hook")
    assert.are.equal(4, #hook)
    assert.are.equal("rbe.rollback.done", hook[4].json.event)
    assert.are.equal(id, hook[4].json.run_id)
    assert.are.equal("done", hook[4].json.result)
    -- every delivery is journaled, after run_start
    local n = 0
    for _, ev in ipairs(events) do
      if ev.ev == "notify" then
        n = n + 1
        assert.is_true(ev.ok, json.encode(ev))
      end
    end
    assert.are.equal(12, n)
    assert.falsy(text:find("XXXXsecretXXXX", 1, true))
    assert.falsy(text:find(KEY, 1, true))
  end)

  it("a failed run sends the failed message; a dead endpoint never fails the run", function()
    local p = playbook("broken", [[
  notify = notify.on_run {
    slack = { webhook = function(ctx) return ctx.vars.slack end },
    webhook = { url = "http://127.0.0.1:1/unreachable-secret-hook", retries = 1 },
  },
  pb.step "a" { run = function() return 1 end, undo = function() end },
  pb.step "b" { run = function() error("boom in b") end },
]])
    local r = rbe_run(p)
    assert.are.equal(1, r.code, r.stderr)
    local events, text = run_files(r)
    local slack = requests("/slack/")
    assert.are.equal(2, #slack)
    local last = slack[2].json.text
    assert.truthy(last:find("Rollback FAILED", 1, true), last)
    assert.truthy(last:find("*Result:* failed, undone", 1, true), last)
    assert.truthy(last:find("*Failed step:* b", 1, true), last)
    assert.truthy(last:find("boom in b", 1, true), last)
    local failures = 0
    for _, ev in ipairs(events) do
      if ev.ev == "notify" and ev.target == "webhook" then
        assert.is_false(ev.ok)
        assert.truthy(ev.error:find("CURLE_COULDNT_CONNECT", 1, true), ev.error)
        failures = failures + 1
      end
    end
    assert.are.equal(2, failures)
    assert.falsy(text:find("unreachable-secret-hook", 1, true))
    assert.truthy(r.stderr:find("notification (failed) to webhook failed", 1, true), r.stderr)
    assert.truthy(r.stderr:find("notify: webhook: CURLE_COULDNT_CONNECT; retry 1/1", 1, true), r.stderr)
    assert.falsy(r.stderr:find("unreachable-secret-hook", 1, true), r.stderr)
  end)

  it("rbe plan shows what a notification step would send, sending nothing", function()
    local p = playbook("planned", [[
  pb.step "tell" (notify.step { message = "started", slack = { webhook = function(ctx) return ctx.vars.slack end } }),
]])
    local r = proc.run({ RBE, "plan", p }, { check = false, env = { TEST_SLACK_URL = base .. SLACK_PATH } })
    assert.are.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("-> would send to slack: Rollback started: planned", 1, true), r.stdout)
    assert.are.equal(0, #requests("/slack/"))
  end)
end)
