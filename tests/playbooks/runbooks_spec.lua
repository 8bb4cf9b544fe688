-- The runbook playbooks (playbooks/phase2.lua, photo-flow.lua,
-- attachments.lua, vercel-alias.lua, emergency.lua) end to end, each
-- against a drill of its own (drill/up.lua: PostgreSQL, Redis with BullMQ,
-- the Node app under pm2, the fake Vercel API), run by the rbe binary the
-- way an operator runs them (`rbe run --yes`, vars from the drill's
-- drill.env through the environment).  Every playbook is checked three
-- ways:
--   - a step fails mid-way (a condition a real incident has: a view on a
--     dropped column, a damaged dump, a change freeze on a table, a stable
--     commit that no longer builds, an app that reads the columns it
--     drops): the undo leaves the stack consistent, as it was;
--   - kill -9 in the middle of a run: `rbe resume` finishes it, and the
--     exactly-once steps ran once;
--   - the end state: deployment, schema version, flags, queues, cache
--     keys, and the data rows kept.
-- One drill per playbook, reused across its scenarios (phase 2 has a
-- second one for its other decisions); drills are taken down in teardown
-- even when a spec fails.
local rbe = require "rbe"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local pg = require "rbe.pg"
local redis = require "rbe.redis"
local http = require "rbe.http"
local json = require "rbe.json"
local support = require "support"

local ROOT = os.getenv("RBE_SOURCE_DIR") or rbe.whoami().cwd
local RBE = support.rbe_bin()
local USER = rbe.whoami().user

local tmp                                   -- this spec's temp dir
local drills = {}                           -- state dirs to take down

---------------------------------------------------------------------------
-- the drill

local function drill_up(name)
  local state = tmp .. "/" .. name
  drills[#drills + 1] = state
  local r = proc.run({ RBE, ROOT .. "/drill/up.lua", state }, { check = false, timeout = "180s" })
  assert(r.code == 0, "drill/up.lua failed:\n" .. r.stderr)
  return support.read_kv(state .. "/drill.env"), state
end

local function drill_down(state)
  proc.run({ RBE, ROOT .. "/drill/down.lua", state }, { check = false, timeout = "120s" })
end

local function sql(E, q, ...)
  local db <close> = pg.connect(rbe.secret(E.DRILL_PG_URL))
  return db:query(q, ...)
end

local function sql1(E, q, ...)
  local r = sql(E, q, ...)[1]
  if not r then return nil end
  local _, v = next(r)
  return v
end

-- nil for SQL NULL and JSON null alike
local function plain(v)
  if v == nil or v == rbe.null or v == json.null then return nil end
  return v
end

local function get(url, token)
  local res = http.get(url, { timeout = "5s", raise = false, retries = 0,
    auth = token and { bearer = rbe.secret(token) } or nil })
  local ok, body = pcall(res.json, res)
  return ok and body or res.body, res.status
end

local function vercel_production(E)
  local p = get(E.DRILL_VERCEL_URL .. "/v9/projects/" .. E.DRILL_PROJECT, E.DRILL_VERCEL_TOKEN)
  return p.targets.production.id
end

local function alias_target(E, alias)
  local a = get(E.DRILL_VERCEL_URL .. "/v4/aliases/" .. alias, E.DRILL_VERCEL_TOKEN)
  return a.deploymentId or (a.alias and a.alias.deploymentId) or a.deployment and a.deployment.id
end

local function git(E, ...)
  return proc.output({ "git", ... }, { cwd = E.DRILL_APP_DIR })
end

local function built(E)
  return json.decode(fs.read(E.DRILL_APP_DIR .. "/dist/build.json")).commit
end

local function wait_until(what, secs, f)
  local deadline = rbe.now() + secs
  while true do
    local ok, v = pcall(f)
    if ok and v then return v end
    if rbe.now() > deadline then
      error("timed out waiting for " .. what .. (ok and "" or (": " .. tostring(v))), 2)
    end
    rbe.sleep(0.1)
  end
end

-- the app's /health once it answers as `version`
local function health_at(E, version)
  return wait_until("the app at " .. version, 20, function()
    local h, status = get(E.DRILL_APP_URL .. "/health")
    return status and type(h) == "table" and h.version == version and h.database == "ok"
      and h.redis == "ok" and h
  end)
end

local function queue_paused(E, q)
  local r <close> = redis.connect(E.DRILL_REDIS_URL)
  return r:hexists("bull:" .. q .. ":meta", "paused") == 1
end

local function count_keys(E, pattern)
  local r <close> = redis.connect(E.DRILL_REDIS_URL)
  local n = 0
  for _ in r:scan { match = pattern, count = 1000 } do n = n + 1 end
  return n
end

local function processed(E, q)
  local r <close> = redis.connect(E.DRILL_REDIS_URL)
  return r:scard("drill:processed:" .. q)
end

local function env_flag(E)
  return fs.read(E.DRILL_ENV_FILE):match("\nFEATURE_PHOTO_FIRST=(%w+)")
end

local ROWS = "select (select count(*) from organizations) as organizations, "
  .. "(select count(*) from users) as users, (select count(*) from work_orders) as work_orders, "
  .. "(select count(*) from messages) as messages"

-- the queues work again: not paused, and jobs get processed
local function queues_processing(E)
  for q in E.DRILL_QUEUES:gmatch("[^,]+") do
    assert.is_false(queue_paused(E, q), q .. " is paused")
    local n0 = processed(E, q)
    wait_until(q .. " processing", 15, function() return processed(E, q) > n0 end)
  end
end

---------------------------------------------------------------------------
-- running playbooks the operator's way

local function argv_of(cmd, book, state, vars)
  local argv = { RBE, cmd, book, "--yes", "--state-dir", state }
  for k, v in pairs(vars or {}) do
    argv[#argv + 1] = "--var"
    argv[#argv + 1] = k .. "=" .. v
  end
  return argv
end

local function run_book(E, name, vars, extra)
  local argv = argv_of("run", ROOT .. "/playbooks/" .. name .. ".lua", E.DRILL_STATE_DIR .. "/rbe", vars)
  argv[#argv + 1] = "--reason"
  argv[#argv + 1] = "runbooks spec"
  for _, a in ipairs(extra or {}) do argv[#argv + 1] = a end
  return proc.run(argv, { env = E, check = false, timeout = "180s", cwd = ROOT })
end

local function plan_book(E, name, vars)
  local argv = { RBE, "plan", ROOT .. "/playbooks/" .. name .. ".lua" }
  for k, v in pairs(vars or {}) do argv[#argv + 1] = "--var"; argv[#argv + 1] = k .. "=" .. v end
  return proc.run(argv, { env = E, check = false, timeout = "60s", cwd = ROOT })
end

-- run with --json and SIGKILL rbe as soon as `step` starts; returns the
-- run id and the events seen
local function run_and_kill(E, name, step, vars)
  local argv = argv_of("run", ROOT .. "/playbooks/" .. name .. ".lua", E.DRILL_STATE_DIR .. "/rbe", vars)
  argv[#argv + 1] = "--json"
  local child <close> = proc.spawn(argv, { env = E, check = false, cwd = ROOT, stderr = "null" })
  local id, killed
  local seen = {}
  rbe.timeout("120s", function()
    for line in child:lines() do
      local ok, ev = pcall(json.decode, line)
      if ok and type(ev) == "table" then
        seen[#seen + 1] = ev
        if ev.ev == "run_start" then id = ev.run_id end
        if ev.ev == "step_start" and ev.step == step then
          child:kill("KILL")
          killed = true
          break
        end
      end
    end
  end)
  child:wait()
  assert(killed, "the run ended before step '" .. step .. "' started")
  -- what the killed run had started (npm, pm2, pg_dump) finishes on its own
  rbe.sleep(1)
  return id, seen
end

local function resume(E, id, vars)
  local argv = { RBE, "resume", id, "--yes", "--state-dir", E.DRILL_STATE_DIR .. "/rbe" }
  for k, v in pairs(vars or {}) do argv[#argv + 1] = "--var"; argv[#argv + 1] = k .. "=" .. v end
  return proc.run(argv, { env = E, check = false, timeout = "180s", cwd = ROOT })
end

local function journal(E, id)
  local out = {}
  for line in fs.lines(E.DRILL_STATE_DIR .. "/rbe/runs/" .. id .. "/journal.jsonl") do
    local ok, ev = pcall(json.decode, line)
    if ok then out[#out + 1] = ev end
  end
  return out
end

local function report(E, id)
  return fs.read(E.DRILL_STATE_DIR .. "/rbe/runs/" .. id .. "/report.md")
end

local function run_id_of(r)
  return r.stderr:match("%(run ([%w-]+), exit") or error("no run id in:\n" .. r.stderr)
end

local function step_status(E, id, step)
  local st
  for _, ev in ipairs(journal(E, id)) do
    if (ev.ev == "step_end" or ev.ev == "step_skip") and ev.step == step then st = ev.status end
    if ev.ev == "undo_end" and ev.step == step and ev.status == "ok" then st = "undone" end
  end
  return st
end

local function secrets_hidden(E, text)
  local pw = E.DRILL_PG_URL:match("^[^/]*//[^:]+:([^@]+)@")
  assert.is_nil(text:find(pw, 1, true), "the database password leaked")
  assert.is_nil(text:find(E.DRILL_VERCEL_TOKEN, 1, true), "the Vercel token leaked")
end

---------------------------------------------------------------------------

setup(function()
  proc.run({ ROOT .. "/tests/fixtures/npm-install.sh" }, { timeout = "300s" })
  tmp = fs.tmpdir("rbe-runbooks-")
end)

teardown(function()
  for _, d in ipairs(drills) do drill_down(d) end
  fs.remove(tmp, { recursive = true, missing_ok = true })
end)

---------------------------------------------------------------------------
describe("#drill phase2.lua", function()
  local E, state

  setup(function() E, state = drill_up("phase2") end)
  teardown(function() drill_down(state) end)

  it("plans what it will touch, read-only", function()
    local r = plan_book(E, "phase2")
    assert.are.equal(0, r.code, r.stderr)
    local out = r.stdout
    assert.matches("would promote " .. E.DRILL_VERCEL_V1_DEPLOYMENT .. " %(1%.4%.0", out)
    assert.matches("would check out v1 %(" .. E.DRILL_APP_V1_SHA:sub(1, 12), out)
    assert.matches("would run 4 down file%(s%) newest first, in one transaction", out)
    assert.matches("20240610093000_add_photo_guard_trigger%.down%.sql", out)
    assert.matches("schema_migrations 20240610093000 %-> 20240129120000", out)
    assert.matches("would UNLINK [%d,]+ keys", out)
    assert.matches("would set feature_flags%.photo_first: true %-> false", out)
    assert.matches("restore the pre%-deploy dump.-skipped: db_mode=migrate", out)
    assert.matches("manual status page", out)
    assert.matches("phase 3%. database rollback  %[budget 10m%]", out)
    secrets_hidden(E, out)
    -- plan wrote nothing
    assert.are.equal(E.DRILL_SCHEMA_V2, sql1(E, "select version::text from schema_migrations"))
    assert.are.equal("main", git(E, "rev-parse", "--abbrev-ref", "HEAD"))
  end)

  it("a down-migration that fails mid-way: everything undone, the stack as it was", function()
    -- someone built a report on a v2 column: its down-migration cannot drop it
    sql(E, "create view photo_report as select id, photo_url from work_orders")
    local rows = sql(E, ROWS)[1]
    local caches = count_keys(E, "gemini:caption:*")
    local r = run_book(E, "phase2")
    assert.are.equal(1, r.code, r.stderr)
    local id = run_id_of(r)
    assert.matches("failed, undone", r.stderr)
    assert.are.equal("failed", step_status(E, id, "down-migrations to the stable schema"))
    for _, s in ipairs { "vercel: promote the last good deployment",
        "git: check out the stable release and build", "stop traffic: pause the queues" } do
      assert.are.equal("undone", step_status(E, id, s), s)
    end
    -- all of it back at v2, consistent
    assert.are.equal(E.DRILL_VERCEL_V2_DEPLOYMENT, vercel_production(E))
    assert.are.equal(E.DRILL_APP_V2_SHA, git(E, "rev-parse", "HEAD"))
    assert.are.equal("main", git(E, "rev-parse", "--abbrev-ref", "HEAD"))
    assert.are.equal(E.DRILL_APP_V2_SHA, built(E))
    local h = health_at(E, "v2")
    assert.are.equal(E.DRILL_APP_V2_SHA, h.commit)
    assert.are.equal(E.DRILL_SCHEMA_V2 .. " false",
      sql1(E, "select version || ' ' || dirty from schema_migrations"))
    assert.is_true(sql1(E, "select to_regclass('message_attachments') is not null"))
    assert.are.same(rows, sql(E, ROWS)[1])
    assert.are.equal("true", env_flag(E))
    assert.is_true(sql1(E, "select enabled from feature_flags where name = 'photo_first'"))
    assert.are.equal(caches, count_keys(E, "gemini:caption:*"))
    assert.are.equal(0, sql1(E, "select count(*) from deployment_history where status = 'rollback'"))
    queues_processing(E)
    assert.matches("Result | %*%*failed, undone%*%*", report(E, id))
    sql(E, "drop view photo_report")
  end)

  it("killed -9 during the down-migrations: rbe resume finishes; the end state is v1, rows kept", function()
    local rows = sql(E, ROWS)[1]
    local sessions = count_keys(E, "session:*")
    local id = run_and_kill(E, "phase2", "down-migrations to the stable schema")
    assert.is_string(id)
    local r = resume(E, id)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("rbe: done", r.stderr)
    -- deployment
    assert.are.equal(E.DRILL_VERCEL_V1_DEPLOYMENT, vercel_production(E))
    assert.are.equal(E.DRILL_APP_V1_SHA, git(E, "rev-parse", "HEAD"))
    assert.are.equal(E.DRILL_APP_V1_SHA, built(E))
    local h = health_at(E, "v1")
    assert.are.equal("ok", h.status)
    -- schema: v1, the v2 objects gone; the migration committed once
    assert.are.equal(E.DRILL_SCHEMA_V1 .. " false",
      sql1(E, "select version || ' ' || dirty from schema_migrations"))
    assert.is_false(sql1(E, "select to_regclass('message_attachments') is not null"))
    assert.are.equal(0, sql1(E, "select count(*) from information_schema.columns "
      .. "where table_name = 'work_orders' and column_name like 'photo%'"))
    assert.are.equal(1, sql1(E, "select count(*) from rbe_steps where run_id = $1 and step = $2",
      id, "down-migrations to the stable schema"))
    -- data rows kept
    assert.are.same(rows, sql(E, ROWS)[1])
    -- flags off: .env is .env.backup, the feature_flags rows false
    assert.are.equal(fs.read(E.DRILL_ENV_BACKUP), fs.read(E.DRILL_ENV_FILE))
    assert.is_false(sql1(E, "select enabled from feature_flags where name = 'photo_first'"))
    assert.is_false(sql1(E, "select enabled from feature_flags where name = 'message_attachments'"))
    -- queues running and processing
    queues_processing(E)
    -- caches: v2's gone (what v1 caches again has no photo fields), sessions kept
    assert.are.equal(0, count_keys(E, "gemini:caption:*"))
    assert.are.equal(sessions, count_keys(E, "session:*"))
    do
      local rc <close> = redis.connect(E.DRILL_REDIS_URL)
      assert.are.equal(rbe.null, rc:get("cache:flags"))
      for key in rc:scan { match = "cache:work_order:*", count = 1000 } do
        local v = rc:get(key)
        assert.is_nil(tostring(v):find("photoUrl", 1, true), key .. " still has v2's shape")
      end
    end
    -- history: the rollback recorded by the operator, 2.0.0 rolled back
    assert.are.equal(USER, sql1(E, "select deployed_by from deployment_history where status = 'rollback'"))
    assert.are.equal("rolled_back", sql1(E, "select status from deployment_history where version = '2.0.0'"))
    -- no more errors
    local size = fs.stat(E.DRILL_APP_LOG).size
    rbe.sleep(1.2)
    assert.is_nil(fs.read(E.DRILL_APP_LOG):sub(size + 1):find(" ERROR ", 1, true))
    -- the report: phases against their budgets, the operator's confirmations
    local rep = report(E, id)
    assert.matches("| 3%. database rollback | 10m00s |", rep)
    assert.matches("status page: .- confirmed by " .. USER, rep)
    secrets_hidden(E, rep .. fs.read(E.DRILL_STATE_DIR .. "/rbe/runs/" .. id .. "/journal.jsonl"))
  end)
end)

describe("#drill phase2.lua, db_mode=restore, with Slack", function()
  local E, state

  setup(function() E, state = drill_up("phase2-restore") end)
  teardown(function() drill_down(state) end)

  it("restores the pre-deploy dump, counts the rows it lost, tells Slack", function()
    local rec <close> = proc.spawn({ "node", ROOT .. "/tests/fixtures/recorder.js" }, { check = false })
    local port = json.decode(rec:lines()()).http
    local hook = ("http://127.0.0.1:%d/slack/T000/B000/secret-part"):format(port)
    local r = run_book(E, "phase2", { db_mode = "restore", slack_webhook = hook })
    assert.are.equal(0, r.code, r.stderr)
    local id = run_id_of(r)
    assert.are.equal("skipped", step_status(E, id, "down-migrations to the stable schema"))
    assert.are.equal("ok", step_status(E, id, "restore the pre-deploy dump"))
    -- the pre-deploy state exactly: rows written after the deploy are gone
    assert.are.equal(E.DRILL_SCHEMA_V1, sql1(E, "select version::text from schema_migrations"))
    assert.are.same({ organizations = 12, users = 360, work_orders = 2400, messages = 4800 },
      sql(E, ROWS)[1])
    local lost
    for _, ev in ipairs(journal(E, id)) do
      if ev.ev == "step_end" and ev.step == "restore the pre-deploy dump" then lost = ev.result.lost end
    end
    assert.are.same({ users = 24, work_orders = 300, messages = 600 }, lost)
    -- this run's own dump of the v2 state is there
    local found = false
    for _, f in ipairs(fs.list(E.DRILL_BACKUP_DIR)) do
      if f:find(id .. "-before-rollback-", 1, true) == 1 and f:match("%.dump$") then found = true end
    end
    assert.is_true(found)
    health_at(E, "v1")
    assert.are.equal(E.DRILL_VERCEL_V1_DEPLOYMENT, vercel_production(E))
    -- Slack got "started" and "done"; the webhook's secret path appears nowhere
    local reqs = get(("http://127.0.0.1:%d/_requests?path=/slack/"):format(port)).requests
    assert.are.equal(2, #reqs)
    assert.matches("Rollback started", reqs[1].json.text)
    assert.matches("Rollback done", reqs[2].json.text)
    assert.is_nil(fs.read(E.DRILL_STATE_DIR .. "/rbe/runs/" .. id .. "/journal.jsonl")
      :find("secret-part", 1, true))
    rec:close()
  end)
end)

---------------------------------------------------------------------------
describe("#drill photo-flow.lua", function()
  local E, state

  setup(function() E, state = drill_up("photo") end)
  teardown(function() drill_down(state) end)

  local PHOTOS = "select md5(string_agg(concat_ws('|', id, photo_url, photo_taken_at, photo_status, "
    .. "photo_first), ',' order by id)) from work_orders"

  it("plans the flag changes and the snapshot", function()
    local r = plan_book(E, "photo-flow", { drop_columns = "yes" })
    assert.are.equal(0, r.code, r.stderr)
    assert.matches('would set FEATURE_PHOTO_FIRST in [^\n]+: "true" %-> "false"', r.stdout)
    assert.matches('would set feature_flags%.photo_first: "true" %-> "false"', r.stdout)
    assert.matches("would copy the photo fields of 380 work orders into data_archive", r.stdout)
    assert.matches("undo: the restore function", r.stdout)
  end)

  it("dropping the columns under the v2 app fails its check: the restore function undoes it", function()
    local photos = sql1(E, PHOTOS)
    local r = run_book(E, "photo-flow", { drop_columns = "yes" })
    assert.are.equal(1, r.code, r.stderr)
    local id = run_id_of(r)
    assert.are.equal("failed", step_status(E, id, "verify: work orders are still served"))
    assert.are.equal("undone", step_status(E, id, "drop the photo columns"))
    assert.matches("restore function: .- 380 work orders' photo data restored", r.stderr)
    -- columns, data, constraint, index and trigger are back
    assert.are.equal(photos, sql1(E, PHOTOS))
    assert.are.equal(1, sql1(E, "select count(*) from pg_trigger where tgname = 'work_orders_photo_guard'"))
    assert.are.equal(1, sql1(E, "select count(*) from pg_indexes where indexname = 'work_orders_photo_status_idx'"))
    assert.are.equal(1, sql1(E, "select count(*) from pg_constraint where conname = 'work_orders_photo_status_check'"))
    -- the archive rows of the run and the flags: as before
    assert.are.equal(0, sql1(E, "select count(*) from data_archive"))
    assert.are.equal("true", env_flag(E))
    assert.is_true(sql1(E, "select enabled from feature_flags where name = 'photo_first'"))
    do
      local rc <close> = redis.connect(E.DRILL_REDIS_URL)
      assert.is_true(json.decode(rc:get("cache:flags")).photo_first)
    end
    -- the app was restarted on the restored .env: photo-first on again
    local h = wait_until("the app degraded again", 20, function()
      local x = get(E.DRILL_APP_URL .. "/health")
      return type(x) == "table" and x.status == "degraded" and x
    end)
    assert.are.equal("v2", h.version)
  end)

  it("killed -9 during the snapshot: resume archives every photo once; the guard holds", function()
    local photos = sql1(E, PHOTOS)
    local rows = sql(E, ROWS)[1]
    local id = run_and_kill(E, "photo-flow", "snapshot the photo data into data_archive")
    local r = resume(E, id)
    assert.are.equal(0, r.code, r.stderr)
    -- the flag is off everywhere, the app runs healthy without it
    assert.are.equal("false", env_flag(E))
    assert.is_false(sql1(E, "select enabled from feature_flags where name = 'photo_first'"))
    do
      local rc <close> = redis.connect(E.DRILL_REDIS_URL)
      assert.is_false(json.decode(rc:get("cache:flags")).photo_first)
    end
    local h = health_at(E, "v2")
    assert.are.equal("ok", h.status)
    -- exactly once: 380 photos, 380 archive rows
    assert.are.equal(380, sql1(E, "select count(*) from data_archive where source_table = "
      .. "'work_orders' and reason = $1", "photo-flow rollback, rbe run " .. id))
    assert.are.equal(380, sql1(E, "select count(distinct source_id) from data_archive"))
    -- the guard: a photo UPDATE is refused by the trigger
    local db <close> = pg.connect(rbe.secret(E.DRILL_PG_URL))
    local ok, err = rbe.try(db.query, db, "update work_orders set photo_url = photo_url || '#x' "
      .. "where id = 2401")
    assert.is_false(ok)
    assert.are.equal("P0001", err.code)
    -- nothing else changed: columns and rows kept
    assert.are.equal(photos, sql1(E, PHOTOS))
    assert.are.same(rows, sql(E, ROWS)[1])
    assert.are.equal(E.DRILL_SCHEMA_V2, sql1(E, "select version::text from schema_migrations"))
  end)
end)

---------------------------------------------------------------------------
describe("#drill attachments.lua", function()
  local E, state

  setup(function() E, state = drill_up("attachments") end)
  teardown(function() drill_down(state) end)

  local function counts()
    return sql(E, "select count(*) filter (where backfilled) as backfilled, "
      .. "count(*) filter (where not backfilled) as uploaded from message_attachments")[1]
  end

  it("option C with a damaged dump: the database is put back, the app too", function()
    local damaged = tmp .. "/damaged.dump"
    local data = fs.read(E.DRILL_PREDEPLOY_DUMP)
    fs.write(damaged, data:sub(1, #data // 2))
    local rows = sql(E, ROWS)[1]
    local r = run_book(E, "attachments", { option = "C", predeploy_dump = damaged })
    assert.are.equal(1, r.code, r.stderr)
    local id = run_id_of(r)
    assert.are.equal("failed", step_status(E, id, "option C: restore the pre-deploy dump"))
    assert.matches("the restore failed and the database was put back from", report(E, id))
    assert.are.equal("undone", step_status(E, id, "git: check out the stable release and build"))
    -- v2 database, every row, and the app back on v2
    assert.are.equal(E.DRILL_SCHEMA_V2, sql1(E, "select version::text from schema_migrations"))
    assert.are.same(rows, sql(E, ROWS)[1])
    assert.are.same({ backfilled = 1920, uploaded = 600 }, counts())
    assert.are.equal(E.DRILL_APP_V2_SHA, git(E, "rev-parse", "HEAD"))
    assert.are.equal(E.DRILL_APP_V2_SHA, built(E))
    health_at(E, "v2")
  end)

  it("option A, killed -9 in its transaction: resume clears the backfilled rows once", function()
    local rows = sql(E, ROWS)[1]
    local id = run_and_kill(E, "attachments", "option A: clear only the backfilled attachments",
      { option = "A" })
    local r = resume(E, id)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("before: 2520 attachments %(1920 backfilled, 600 uploaded%)", r.stderr .. report(E, id)
      .. fs.read(E.DRILL_STATE_DIR .. "/rbe/runs/" .. id .. "/journal.jsonl"))
    assert.are.same({ backfilled = 0, uploaded = 600 }, counts())
    local tag = "attachments rollback, rbe run " .. id
    assert.are.equal(1920, sql1(E, "select count(*) from data_archive where source_table = "
      .. "'message_attachments' and reason = $1", tag))
    assert.are.same(rows, sql(E, ROWS)[1])
    -- v1 serves every message's mediaUrl
    health_at(E, "v1")
    for _, mid in ipairs { 1, 2, 4802, 5400 } do
      local want = sql1(E, "select media_url from messages where id = $1", mid)
      local m = get(E.DRILL_APP_URL .. "/api/messages/" .. mid)
      assert.are.equal(plain(want), plain(m.mediaUrl), "message " .. mid)
    end
  end)

  it("option B drops the attachments schema and keeps its rows in the archive", function()
    local r = run_book(E, "attachments", { option = "B" })
    assert.are.equal(0, r.code, r.stderr)
    local id = run_id_of(r)
    assert.are.equal("skipped", step_status(E, id, "git: check out the stable release and build"))
    assert.is_false(sql1(E, "select to_regclass('message_attachments') is not null"))
    assert.are.equal(0, sql1(E, "select count(*) from information_schema.columns "
      .. "where table_name = 'messages' and column_name = 'attachment_count'"))
    assert.are.equal(600, sql1(E, "select count(*) from data_archive where source_table = "
      .. "'message_attachments' and reason = $1", "attachments rollback, rbe run " .. id))
    assert.are.equal(5400, sql1(E, "select count(*) from messages"))
  end)
end)

---------------------------------------------------------------------------
describe("#drill vercel-alias.lua", function()
  local E, state

  setup(function() E, state = drill_up("vercel") end)
  teardown(function() drill_down(state) end)

  local ALIASES = { "drill-app.example.com", "drill-app.vercel.app" }
  local FAST = { monitor_for = "3s", monitor_every = "1s" }

  it("its trigger fires on the v2 error rate (rbe watch --dry-run)", function()
    -- enough traffic since the app started to measure a rate
    wait_until("20 API requests", 30, function()
      return get(E.DRILL_APP_URL .. "/api/metrics").requests >= 20
    end)
    local r = proc.run({ RBE, "watch", ROOT .. "/playbooks/vercel-alias.lua", "--dry-run",
      "--max-checks", "1", "--state-dir", E.DRILL_STATE_DIR .. "/rbe" },
      { env = E, check = false, timeout = "60s", cwd = ROOT })
    assert.are.equal(0, r.code, r.stderr)
    local rate = tonumber(r.stderr:match("check 1: fired %(1/2%): error rate ([%d.]+)%%"))
    assert.is_truthy(rate, r.stderr)
    assert.is_true(rate > 5)
  end)

  it("a change freeze on deployment_history: the alias goes back", function()
    sql(E, [[create function change_freeze() returns trigger language plpgsql as $$
      begin raise exception 'deployment_history is frozen (change freeze)'; end $$]])
    sql(E, "create trigger change_freeze before insert on deployment_history "
      .. "for each row execute function change_freeze()")
    local r = run_book(E, "vercel-alias", FAST)
    assert.are.equal(1, r.code, r.stderr)
    local id = run_id_of(r)
    assert.are.equal("failed", step_status(E, id, "record the rollback in deployment_history"))
    assert.are.equal("undone", step_status(E, id, "swap the alias"))
    for _, a in ipairs(ALIASES) do
      assert.are.equal(E.DRILL_VERCEL_V2_DEPLOYMENT, alias_target(E, a), a)
    end
    assert.are.equal(E.DRILL_VERCEL_V2_DEPLOYMENT, vercel_production(E))
    assert.are.equal("active", sql1(E, "select status from deployment_history where version = '2.0.0'"))
    -- the fake saw the swap, the purge and the swap back
    local calls = get(E.DRILL_VERCEL_URL .. "/_calls").calls
    local moved, purged = 0, 0
    for _, c in ipairs(calls) do
      if c.method == "POST" and c.path:find("/aliases$") then moved = moved + 1 end
      if c.path:find("invalidate%-by%-tags") then purged = purged + 1 end
    end
    assert.are.equal(4, moved)
    assert.are.equal(1, purged)
    sql(E, "drop trigger change_freeze on deployment_history")
    sql(E, "drop function change_freeze()")
  end)

  it("killed -9 while monitoring: resume monitors again and ends with one rollback row", function()
    local id = run_and_kill(E, "vercel-alias", "monitor health", FAST)
    local r = resume(E, id)
    assert.are.equal(0, r.code, r.stderr)
    for _, a in ipairs(ALIASES) do
      assert.are.equal(E.DRILL_VERCEL_V1_DEPLOYMENT, alias_target(E, a), a)
    end
    assert.are.equal(E.DRILL_VERCEL_V1_DEPLOYMENT, vercel_production(E))
    local rows = sql(E, "select version, git_sha, vercel_deployment_id, deployed_by from "
      .. "deployment_history where status = 'rollback'")
    assert.are.equal(1, #rows)
    assert.are.equal("1.4.0", rows[1].version)
    assert.are.equal(E.DRILL_APP_V1_SHA, rows[1].git_sha)
    assert.are.equal(USER, rows[1].deployed_by)
    assert.are.equal("rolled_back", sql1(E, "select status from deployment_history where version = '2.0.0'"))
    local checks = 0
    for _, ev in ipairs(journal(E, id)) do
      if ev.ev == "log" and ev.step == "monitor health" then checks = checks + 1 end
    end
    assert.is_true(checks >= 3)
  end)
end)

---------------------------------------------------------------------------
describe("#drill emergency.lua", function()
  local E, state

  setup(function() E, state = drill_up("emergency") end)
  teardown(function() drill_down(state) end)

  it("a stable commit that does not build: the checkout goes back, rebuilt, queues resumed", function()
    -- a tag on a commit whose build fails, as an old commit can on a new machine
    local env = { GIT_AUTHOR_NAME = "t", GIT_AUTHOR_EMAIL = "t@t", GIT_COMMITTER_NAME = "t",
                  GIT_COMMITTER_EMAIL = "t@t" }
    local function g(...) proc.run({ "git", ... }, { cwd = E.DRILL_APP_DIR, env = env }) end
    g("checkout", "-q", "-b", "broken", "v1")
    fs.write(E.DRILL_APP_DIR .. "/build.js", "process.exit(1);\n")
    g("commit", "-qam", "broken build")
    g("tag", "v1-broken")
    g("checkout", "-q", "main")
    g("branch", "-q", "-D", "broken")
    local keys = count_keys(E, "session:*")
    local r = run_book(E, "emergency", { stable_ref = "v1-broken" })
    assert.are.equal(1, r.code, r.stderr)
    local id = run_id_of(r)
    assert.are.equal("failed", step_status(E, id, "npm run build"))
    assert.are.equal("undone", step_status(E, id, "git: check out the stable commit"))
    assert.are.equal("undone", step_status(E, id, "pause the queues"))
    assert.are.equal(E.DRILL_APP_V2_SHA, git(E, "rev-parse", "HEAD"))
    assert.are.equal("main", git(E, "rev-parse", "--abbrev-ref", "HEAD"))
    assert.are.equal(E.DRILL_APP_V2_SHA, built(E))
    health_at(E, "v2")
    queues_processing(E)
    assert.are.equal(keys, count_keys(E, "session:*"))
  end)

  it("killed -9 during npm install: resume finishes; v1 healthy, queues back, caches flushed", function()
    local rows = sql(E, ROWS)[1]
    local id = run_and_kill(E, "emergency", "npm install")
    local r = resume(E, id)
    assert.are.equal(0, r.code, r.stderr)
    -- the stable commit comes from deployment_history
    assert.are.equal(E.DRILL_APP_V1_SHA, git(E, "rev-parse", "HEAD"))
    assert.are.equal(E.DRILL_APP_V1_SHA, built(E))
    assert.are.equal("ok", health_at(E, "v1").status)
    queues_processing(E)
    for p in E.DRILL_CACHE_PATTERNS:gmatch("[^,]+") do
      if p ~= "cache:work_order:*" then         -- the app caches those again
        assert.are.equal(0, count_keys(E, p), p)
      end
    end
    assert.are.same(rows, sql(E, ROWS)[1])
    -- what phase 1 gathered is in the journal, for the post-mortem
    local info = {}
    for _, ev in ipairs(journal(E, id)) do
      if ev.ev == "step_end" and ev.status == "ok" then info[ev.step] = ev.result end
    end
    assert.is_true(info["log: error counts"].errors > 0)
    assert.are.equal(E.DRILL_APP_V2_SHA, info["git: revision and recent commits"].sha)
    assert.are.equal(2700, info["database: row counts"].rows.work_orders)
    assert.is_true(info["disk: free space"].avail_kb > 0)
    assert.are.equal("degraded", info["app: health and error rate"].health)
    -- the flushed keys were saved in the run directory first
    local saved = false
    for _, f in ipairs(fs.list(E.DRILL_STATE_DIR .. "/rbe/runs/" .. id)) do
      if f:match("^cache%-.*%.backup$") then saved = true end
    end
    assert.is_true(saved)
  end)
end)
