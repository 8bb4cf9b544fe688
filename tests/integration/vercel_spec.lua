-- modules/vercel.lua against the drill's fake Vercel API
-- (drill/fake-vercel.js: Vercel's documented request and response shapes,
-- every call recorded at GET /_calls), started fresh for each spec with a
-- seed of six deployments: listing with pagination, the production
-- target, the last good deployment, aliases (409 "already assigned" is
-- success), promote and rollback waiting for the alias job, 401, 404
-- deployment_not_found, a promote job that fails (the aliases listed),
-- and the ready-made steps through `rbe run` / `rbe plan`: undo points
-- production back, and the token appears nowhere.
local rbe = require "rbe"
local http = require "rbe.http"
local json = require "rbe.json"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local support = require "support"
local vercel = require "vercel"

local ROOT = os.getenv("RBE_SOURCE_DIR") or rbe.whoami().cwd
local FAKE = ROOT .. "/drill/fake-vercel.js"
local RBE = support.rbe_bin()
local TOKEN = "vrcl-TOKEN-9f8e7d6c5b4a"
local NOW = os.time()

local srv, base, tmp, v

local function dep(uid, version, days, state, target, ref)
  return {
    uid = uid, name = "web", url = "web-" .. uid:sub(5) .. "-team.vercel.app",
    created = (NOW - days * 86400) * 1000, buildingAt = (NOW - days * 86400) * 1000 + 2000,
    ready = state == "READY" and (NOW - days * 86400) * 1000 + 60000 or json.null,
    readyState = state, target = target or json.null, source = "git",
    aliasAssigned = json.null,
    creator = { uid = "user_ci", username = "ci" },
    meta = { githubCommitSha = ("%07d"):format(days) .. ("0"):rep(33), githubCommitRef = ref or "main",
             appVersion = version },
  }
end

local SEED = {
  token = TOKEN,
  project = { id = "prj_web123", name = "web" },
  aliases = { "web.example.com", "web-team.vercel.app" },
  production = "dpl_v2",
  deployments = {
    dep("dpl_v2", "2.0.0", 1, "READY", "production"),
    dep("dpl_rc1", "2.0.0-rc1", 2, "ERROR", "production"),
    dep("dpl_preview", "2.0.0-beta", 3, "READY", nil, "feature/x"),
    dep("dpl_v1", "1.4.0", 10, "READY", "production"),
    dep("dpl_v09", "1.3.0", 30, "READY", "production"),
    dep("dpl_v08", "1.2.0", 45, "READY", "production"),
  },
}

local function calls()
  return http.get(base .. "/_calls"):json().calls
end

local function state()
  return http.get(base .. "/_state"):json()
end

local function client(token)
  return vercel.client { token = token or TOKEN, base_url = base, poll = "50ms", wait = "20s" }
end

before_each(function()
  for _, e in ipairs { "http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY" } do
    rbe.setenv(e, nil)
  end
  tmp = fs.tmpdir("rbe-vercel-")
  fs.write(tmp .. "/seed.json", json.encode(SEED))
  srv = proc.spawn({ "node", FAKE }, { stderr = "inherit", env = {
    SEED_FILE = tmp .. "/seed.json", PORT = "0", JOB_DELAY_MS = "150" } })
  local line = rbe.timeout("20s", srv:lines())
  local port = assert(line and line:match("127%.0%.0%.1:(%d+)"), "fake-vercel printed no port")
  base = "http://127.0.0.1:" .. port
  v = client()
end)

after_each(function()
  if v then v:close() end
  http.close_idle()
  if srv then srv:close() end
  if tmp then fs.remove(tmp, { recursive = true }) end
end)

describe("#vercel reading", function()
  it("lists READY production deployments newest first, following pagination", function()
    local list = v:deployments { project = "web", page_size = 1 }
    local ids = {}
    for i, d in ipairs(list) do ids[i] = d.id end
    assert.are.same({ "dpl_v2", "dpl_v1", "dpl_v09", "dpl_v08" }, ids)
    assert.are.equal("1.4.0", list[2].meta.appVersion)
    local c = calls()
    assert.are.equal(4, #c)   -- one page per deployment; the last has next = null
    for _, call in ipairs(c) do
      assert.are.equal("/v6/deployments", call.path)
      assert.are.equal("web", call.query.projectId)
      assert.are.equal("production", call.query.target)
      assert.are.equal("READY", call.query.state)
      assert.are.equal("1", call.query.limit)
      assert.is_true(call.authorized)
    end
    assert.is_nil(c[1].query["until"])
    assert.are.equal(tostring(list[1].created), c[2].query["until"])
    assert.are.equal(tostring(list[3].created), c[4].query["until"])
    -- a limit stops early; no filter lists every deployment
    assert.are.equal(1, #v:deployments { project = "web", limit = 1 })
    assert.are.equal(6, #v:deployments { project = "web", target = false, state = false })
  end)

  it("reads production and the last good deployment before it", function()
    assert.are.equal("dpl_v2", v:current("web").id)
    local good = v:last_good { project = "web" }
    assert.are.equal("dpl_v1", good.id)           -- not the ERROR rc1, not the preview
    assert.are.equal("dpl_v09", v:last_good { project = "web", before = "dpl_v1" }.id)
    assert.are.equal("dpl_v09", v:last_good { project = "prj_web123", before = good }.id)
    local err = support.raises(v.last_good, v, { project = "web", before = "dpl_v08" })
    assert.are.equal("vercel", err.kind)
    assert.are.equal("ENOTFOUND", err.code)
    assert.truthy(tostring(err):find("no READY production deployment of web before dpl_v08", 1, true))
  end)

  it("a bad token is a 401 `forbidden` error that does not show the token", function()
    local bad = client("wrong-token-" .. TOKEN)
    local err = support.raises(bad.current, bad, "web")
    bad:close()
    assert.are.equal("vercel", err.kind)
    assert.are.equal(401, err.status)
    assert.are.equal("forbidden", err.code)
    assert.is_false(err.retryable)
    assert.truthy(tostring(err):find("GET /v9/projects/web -> 401 forbidden", 1, true), tostring(err))
    for _, text in ipairs { tostring(err), json.encode(require("rbe.journal").sanitize(err)) } do
      assert.falsy(text:find(TOKEN, 1, true))
    end
    assert.is_false(calls()[1].authorized)
    assert.truthy(tostring(v):find(base, 1, true))
    assert.falsy(tostring(v):find(TOKEN, 1, true))
  end)
end)

describe("#vercel aliases", function()
  it("moves an alias and records the deployment it had; 409 already assigned is success", function()
    local r = v:alias("dpl_v1", "web.example.com")
    assert.is_true(r.changed)
    assert.are.equal("dpl_v2", r.previous)
    assert.are.equal("dpl_v1", v:alias_target("web.example.com"))
    local again = v:alias("dpl_v1", "web.example.com")
    assert.is_false(again.changed)
    assert.is_true(again.already)
    assert.are.equal("dpl_v1", again.previous)
    local c = calls()
    assert.are.equal("POST", c[1].method)
    assert.are.equal("/v2/deployments/dpl_v1/aliases", c[1].path)
    assert.are.same({ alias = "web.example.com" }, c[1].body)
    assert.are.equal(409, c[3].status)
    -- the other alias still points at v2: production has not moved
    assert.are.equal("dpl_v2", state().production)
  end)

  it("an unknown deployment is 404 deployment_not_found", function()
    local err = support.raises(v.alias, v, "dpl_nope", "web.example.com")
    assert.are.equal(404, err.status)
    assert.are.equal("deployment_not_found", err.code)
    assert.truthy(tostring(err):find("Deployment dpl_nope not found", 1, true))
  end)
end)

describe("#vercel promote and rollback", function()
  it("promotes and waits for the alias job to succeed", function()
    local r = v:promote("web", "dpl_v1")
    assert.are.equal("succeeded", r.job_status)
    assert.are.equal("dpl_v2", r.from)
    assert.are.equal("dpl_v1", r.to)
    assert.are.equal("dpl_v1", v:current("web").id)
    local st = state()
    assert.are.equal("dpl_v1", st.production)
    for _, a in ipairs(st.aliases) do assert.are.equal("dpl_v1", a.deploymentId) end
    local posts, polls = 0, 0
    for _, c in ipairs(calls()) do
      if c.method == "POST" then
        posts = posts + 1
        assert.are.equal("/v10/projects/web/promote/dpl_v1", c.path)
        assert.are.equal(202, c.status)
      elseif c.path == "/v9/projects/web" then
        polls = polls + 1
      end
    end
    assert.are.equal(1, posts)
    assert.truthy(polls >= 3, "polled " .. polls)   -- before, pending..., succeeded
  end)

  it("rolls back with a description (201) and waits", function()
    local r = v:rollback("web", "dpl_v09", { description = "INC-1: bad 2.0.0" })
    assert.are.equal("succeeded", r.job_status)
    local post
    for _, c in ipairs(calls()) do if c.method == "POST" then post = c end end
    assert.are.equal("/v1/projects/web/rollback/dpl_v09", post.path)
    assert.are.equal("INC-1: bad 2.0.0", post.query.description)
    assert.are.equal(201, post.status)
    assert.are.equal("rollback", state().project.lastRollbackTarget.type)
    assert.are.equal("dpl_v09", v:current("web").id)
  end)

  it("a promote job that fails raises, naming the aliases that did not move", function()
    http.post(base .. "/_fail_next_promote")
    local err = support.raises(v.promote, v, "web", "dpl_v1")
    assert.are.equal("vercel", err.kind)
    assert.are.equal("promote_failed", err.code)
    assert.truthy(tostring(err):find("promote of dpl_v1 to production of web failed (jobStatus failed)", 1, true),
      tostring(err))
    assert.truthy(tostring(err):find("aliases not moved: web.example.com, web-team.vercel.app", 1, true),
      tostring(err))
    assert.are.same({ "web.example.com", "web-team.vercel.app" }, err.aliases)
    assert.are.equal("dpl_v2", v:current("web").id)
  end)

  it("404 deployment_not_found and 400 deployment_not_ready are raised before any wait", function()
    local err = support.raises(v.promote, v, "web", "dpl_nope")
    assert.are.equal("deployment_not_found", err.code)
    assert.are.equal(404, err.status)
    err = support.raises(v.promote, v, "web", "dpl_rc1")
    assert.are.equal("deployment_not_ready", err.code)
    err = support.raises(v.rollback, v, "web", "dpl_preview")
    assert.are.equal(422, err.status)
    assert.are.equal("dpl_v2", v:current("web").id)
  end)

  it("a second promote while a job is pending is 409 alias_request_in_progress", function()
    v:promote("web", "dpl_v1", { wait = false })
    local err = support.raises(v.promote, v, "web", "dpl_v09", { wait = false })
    assert.are.equal(409, err.status)
    assert.are.equal("alias_request_in_progress", err.code)
    v:wait_alias_job("web", "dpl_v1")
    assert.are.equal("dpl_v1", v:current("web").id)
  end)
end)

-- a playbook using the vercel steps, run with `rbe run`
local function playbook(name, body)
  local p = tmp .. "/" .. name .. ".lua"
  fs.write(p, ([[
local pb = require "rbe.playbook"
local vercel = require "vercel"
local conf = {
  token = function(ctx) return ctx.vars.token end,
  base_url = function(ctx) return ctx.vars.api end,
  project = "web", poll = "50ms",
}
local function with(t) for k, x in pairs(conf) do t[k] = x end return t end
return pb.playbook %q {
  vars = { token = { env = "TEST_VERCEL_TOKEN", secret = true, required = true },
           api = { required = true }, fail = { default = "no" } },
%s
}
]]):format(name, body))
  return p
end

local function rbe_cmd(args)
  local argv = { RBE }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return proc.run(argv, { check = false, timeout = "60s",
    env = { NO_COLOR = "1", TEST_VERCEL_TOKEN = TOKEN } })
end

local function run_texts(r)
  local id = (r.stderr .. r.stdout):match("run (%d+%-%d+%-%x+)")
  assert(id, r.stderr)
  local dir = tmp .. "/state/runs/" .. id
  return fs.read(dir .. "/journal.jsonl"), fs.read(dir .. "/report.md")
end

describe("#vercel steps", function()
  it("promote_step moves production back; a later failure undoes it", function()
    local p = playbook("promote", [[
  pb.step "production to last good" (vercel.promote_step(with { to = "last_good" })),
  pb.step "later step" { run = function(ctx) if ctx.vars.fail == "yes" then error("smoke test failed") end end },
]])
    local r = rbe_cmd { "run", p, "--var", "api=" .. base, "--var", "fail=yes",
      "--state-dir", tmp .. "/state", "--reason", "INC-5" }
    assert.are.equal(1, r.code, r.stderr)
    assert.are.equal("dpl_v2", state().production)    -- undone: production back at v2
    local promotes = {}
    for _, c in ipairs(calls()) do
      if c.method == "POST" then promotes[#promotes + 1] = c.path end
    end
    assert.are.same({ "/v10/projects/web/promote/dpl_v1", "/v10/projects/web/promote/dpl_v2" }, promotes)
    local journal, report = run_texts(r)
    assert.truthy(journal:find('"previous":"dpl_v2"', 1, true), journal)
    assert.truthy(journal:find('"to":"dpl_v1"', 1, true))
    assert.truthy(journal:find("promoting dpl_v2 back to production of web", 1, true))
    assert.truthy(report:find("production to last good (step): undone", 1, true), report)
    for _, text in ipairs { journal, report, r.stdout, r.stderr } do
      assert.falsy(text:find(TOKEN, 1, true))
    end
  end)

  it("rollback_step and alias_step succeed and journal what they moved", function()
    local p = playbook("both", [[
  pb.step "roll back" (vercel.rollback_step(with { to = function(ctx, c) return c:last_good { project = "web" } end })),
  pb.step "extra alias" (vercel.alias_step(with { to = "dpl_v09", alias = "web.example.com" })),
]])
    local r = rbe_cmd { "run", p, "--var", "api=" .. base, "--state-dir", tmp .. "/state" }
    assert.are.equal(0, r.code, r.stderr)
    local journal = run_texts(r)
    local results = {}
    for l in journal:gmatch("[^\n]+") do
      local ev = json.decode(l)
      if ev.ev == "step_end" then results[ev.step] = ev.result end
    end
    assert.are.equal("dpl_v2", results["roll back"].previous)
    assert.are.equal("dpl_v1", results["roll back"].to)
    assert.is_true(results["roll back"].changed)
    assert.are.same({ { alias = "web.example.com", changed = true, previous = "dpl_v1" } },
      results["extra alias"].aliases)
    local st = state()
    for _, a in ipairs(st.aliases) do
      assert.are.equal(a.alias == "web.example.com" and "dpl_v09" or "dpl_v1", a.deploymentId)
    end
    local rb
    for _, c in ipairs(calls()) do if c.path:find("/rollback/", 1, true) then rb = c end end
    assert.truthy(rb.query.description:find("^rbe run %d+%-%d+%-%x+ %(both%)"), rb.query.description)
  end)

  it("alias_step undo points the alias back at its previous deployment", function()
    local p = playbook("alias_undo", [[
  pb.step "alias" (vercel.alias_step(with { to = "dpl_v1", alias = { "web.example.com", "web-team.vercel.app" } })),
  pb.step "boom" { run = function() error("boom") end },
]])
    local r = rbe_cmd { "run", p, "--var", "api=" .. base, "--state-dir", tmp .. "/state" }
    assert.are.equal(1, r.code, r.stderr)
    local st = state()
    assert.are.equal("dpl_v2", st.production)
    for _, a in ipairs(st.aliases) do assert.are.equal("dpl_v2", a.deploymentId) end
    local n = 0
    for _, c in ipairs(calls()) do if c.method == "POST" then n = n + 1 end end
    assert.are.equal(4, n)
  end)

  it("a failed promote job fails the step with the aliases in the report, token masked", function()
    http.post(base .. "/_fail_next_promote")
    local p = playbook("failing", [[
  pb.step "promote v1" (vercel.promote_step(with { to = "dpl_v1" })),
]])
    local r = rbe_cmd { "run", p, "--var", "api=" .. base, "--state-dir", tmp .. "/state" }
    assert.are.equal(1, r.code, r.stderr)
    local journal, report = run_texts(r)
    assert.truthy(report:find("promote of dpl_v1 to production of web failed", 1, true), report)
    assert.truthy(report:find("aliases not moved: web.example.com, web-team.vercel.app", 1, true), report)
    assert.falsy(journal:find(TOKEN, 1, true))
    assert.falsy(report:find(TOKEN, 1, true))
  end)

  it("rbe plan shows the deployment it would promote and changes nothing", function()
    local p = playbook("planned", [[
  pb.step "production to last good" (vercel.promote_step(with { to = "last_good" })),
]])
    local r = rbe_cmd { "plan", p, "--var", "api=" .. base }
    assert.are.equal(0, r.code, r.stderr)
    assert.truthy(r.stdout:find("-> would promote dpl_v1 (1.4.0, commit 0000010", 1, true), r.stdout)
    assert.truthy(r.stdout:find("as production of web", 1, true), r.stdout)
    assert.truthy(r.stdout:find("-> production is now dpl_v2 (2.0.0", 1, true), r.stdout)
    assert.truthy(r.stdout:find("token=***", 1, true), r.stdout)
    assert.falsy(r.stdout:find(TOKEN, 1, true))
    for _, c in ipairs(calls()) do assert.are.equal("GET", c.method) end
  end)
end)
