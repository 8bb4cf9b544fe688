-- The drill environment itself (drill/up.lua, drill/down.lua): one real
-- drill is started in a temp dir and every piece is checked through the
-- tools an operator would use (psql, redis-cli, pm2, git, HTTP through
-- drill/httpc.js): the v2 schema and data, the down-migrations, the cache
-- keys, the BullMQ worker processing every job exactly once, the app at v2
-- under pm2 reporting degraded, the fake Vercel API with production at v2
-- and its token enforced.  Then down must leave no process and no file.
-- Failure paths: an up that fails half-way (kept, then taken down; or
-- cleaned up at once) and a state dir that is not a drill's.
-- The drill starts its own PostgreSQL and Redis (not the shared fixture).
local rbe = require "rbe"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local json = require "rbe.json"

local ROOT = os.getenv("RBE_SOURCE_DIR") or rbe.whoami().cwd
local RBE = os.getenv("RBE_BIN") or (ROOT .. "/build/bin/rbe")
local HTTPC = ROOT .. "/drill/httpc.js"

local tmp                    -- this spec's temp dir
local E                      -- the drill's drill.env

-- rbe drill/<script> dir -> result (never raises)
local function drill(script, dir, env)
  return proc.run({ RBE, ROOT .. "/drill/" .. script, dir },
    { check = false, timeout = "120s", env = env })
end

local read_kv = require("support").read_kv

local function psql(sql, opts)
  return proc.run({ E.DRILL_PG_BINDIR .. "/psql", "-X", "-At", "-q", "-v", "ON_ERROR_STOP=1",
    "-d", rbe.secret(E.DRILL_PG_URL), "-c", sql }, opts)
end

local function sql1(sql)
  return (psql(sql).stdout:gsub("\n$", ""))
end

local function redis(...)
  return proc.output { "redis-cli", "-h", "127.0.0.1", "-p", E.DRILL_REDIS_PORT, ... }
end

local function count_keys(pattern)
  return tonumber(redis("EVAL", "return #redis.call('KEYS', ARGV[1])", "0", pattern))
end

-- http(method, url[, {bearer, json}]) -> {status, body}
local function http(method, url, o)
  o = o or {}
  local argv = { "node", HTTPC, method, url }
  if o.bearer then argv[#argv + 1] = "--bearer"; argv[#argv + 1] = o.bearer end
  if o.json then argv[#argv + 1] = "--json"; argv[#argv + 1] = json.encode(o.json) end
  return json.decode(proc.output(argv, { timeout = "15s" }))
end

local function vercel(method, path, o)
  o = o or {}
  if o.bearer == nil then o.bearer = E.DRILL_VERCEL_TOKEN end
  if o.bearer == false then o.bearer = nil end
  return http(method, E.DRILL_VERCEL_URL .. path, o)
end

local function wait_until(what, secs, f)
  local deadline = rbe.now() + secs
  while true do
    local v = f()
    if v then return v end
    if rbe.now() > deadline then error("timed out waiting for " .. what, 2) end
    rbe.sleep(0.05)
  end
end

-- dead: gone, or a zombie waiting for init
local function dead(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return true end
  local s = f:read("a")
  f:close()
  local st = s:match("%) (%a)")
  return st == "Z" or st == "X"
end

-- live processes marked as this drill's (what down must leave none of)
local function owned(state)
  local out = {}
  for _, name in ipairs(fs.list("/proc")) do
    local pid = tonumber(name)
    if pid and not dead(pid) then
      local f = io.open("/proc/" .. pid .. "/environ", "rb")
      local env = f and f:read("a")
      if f then f:close() end
      if env and ("\0" .. env):find("\0RBE_DRILL_OWNER=" .. state .. "\0", 1, true) then
        out[#out + 1] = pid
      end
    end
  end
  return out
end

local function processed(q) return tonumber(redis("SCARD", "drill:processed:" .. q)) end
local function produced(q) return tonumber(redis("SCARD", "drill:produced:" .. q)) end
local function queues()
  local t = {}
  for q in E.DRILL_QUEUES:gmatch("[^,]+") do t[#t + 1] = q end
  return t
end

setup(function()
  -- the npm packages (bullmq, pm2, ...): a no-op when already installed
  proc.run({ ROOT .. "/tests/fixtures/npm-install.sh" }, { timeout = "300s" })
  tmp = fs.tmpdir("rbe-drill-spec-")
end)

teardown(function()
  -- whatever a failed spec left behind
  for _, d in ipairs { "state", "failed", "kept" } do
    if fs.exists(tmp .. "/" .. d) then drill("down.lua", tmp .. "/" .. d) end
  end
  fs.remove(tmp, { recursive = true, missing_ok = true })
end)

describe("#drill the drill environment", function()
  local state

  it("starts with one command and writes drill.env and drill.json", function()
    state = tmp .. "/state"
    local t0 = rbe.now()
    local r = drill("up.lua", state)
    assert(r.code == 0, "drill/up.lua failed:\n" .. r.stderr)
    assert.are.equal(state .. "/drill.env", (r.stdout:gsub("\n$", "")))
    assert.is_true(rbe.now() - t0 < 60)
    E = read_kv(state .. "/drill.env")
    local j = json.decode(fs.read(state .. "/drill.json"))
    for _, k in ipairs { "DRILL_PG_URL", "DRILL_PG_ADMIN_URL", "DRILL_REDIS_URL", "DRILL_APP_URL",
        "DRILL_APP_DIR", "DRILL_VERCEL_URL", "DRILL_VERCEL_TOKEN", "DRILL_PROJECT",
        "DRILL_MIGRATIONS_DIR", "DRILL_ENV_FILE", "DRILL_QUEUE", "DRILL_QUEUES",
        "DRILL_PM2_HOME", "DRILL_PID_WORKER", "DRILL_PID_VERCEL", "DRILL_PID_PM2" } do
      assert.is_truthy(E[k] and E[k] ~= "", "drill.env lacks " .. k)
      assert.are.equal(E[k], tostring(j[k]), "drill.json differs on " .. k)
    end
    assert.matches("^http://127%.0%.0%.1:%d+$", E.DRILL_APP_URL)
    assert.matches("^http://127%.0%.0%.1:%d+$", E.DRILL_VERCEL_URL)
    assert.matches("@127%.0%.0%.1:%d+/drill$", E.DRILL_PG_URL)
  end)

  it("#pg holds the v2 schema, tracked like golang-migrate, with seeded data", function()
    assert.are.equal(E.DRILL_SCHEMA_V2 .. "|f",
      sql1("SELECT version || '|' || CASE WHEN dirty THEN 't' ELSE 'f' END FROM schema_migrations"))
    assert.are.equal("1", sql1("SELECT count(*) FROM schema_migrations"))
    -- every up migration has its down, named as golang-migrate wants
    local ups, downs = 0, 0
    for _, name in ipairs(fs.list(E.DRILL_MIGRATIONS_DIR)) do
      if name:match("^%d+_[%w_]+%.up%.sql$") then ups = ups + 1
      elseif name:match("^%d+_[%w_]+%.down%.sql$") then downs = downs + 1
      else error("unexpected file in migrations: " .. name) end
    end
    assert.are.equal(ups, downs)
    assert.is_true(ups >= 8)
    local counts = sql1([[SELECT concat_ws(' ',
      (SELECT count(*) FROM organizations), (SELECT count(*) FROM users),
      (SELECT count(*) FROM work_orders), (SELECT count(*) FROM messages),
      (SELECT count(*) FROM message_attachments WHERE backfilled),
      (SELECT count(*) FROM message_attachments WHERE NOT backfilled))]])
    assert.are.equal("12 384 2700 5400 1920 600", counts)
    -- rows written after the v2 deploy, using the v2 columns
    local deployed = sql1("SELECT extract(epoch FROM deployed_at)::bigint "
      .. "FROM deployment_history WHERE status = 'active'")
    assert.are.equal("380", sql1(("SELECT count(*) FROM work_orders WHERE photo_url IS NOT NULL "
      .. "AND updated_at >= to_timestamp(%s)"):format(deployed)))
    assert.are.equal("600", sql1(("SELECT count(*) FROM messages WHERE created_at >= to_timestamp(%s)")
      :format(deployed)))
    assert.are.equal("0", sql1("SELECT count(*) FROM messages WHERE created_at >= to_timestamp("
      .. deployed .. ") AND attachment_count > 0 AND media_url IS NULL"))
    -- the v2 objects: a trigger, indexes, a constraint
    assert.are.equal("work_orders_photo_guard", sql1(
      "SELECT tgname FROM pg_trigger WHERE tgrelid = 'work_orders'::regclass AND NOT tgisinternal"))
    assert.are.equal("2", sql1("SELECT count(*) FROM pg_indexes WHERE indexname IN "
      .. "('message_attachments_message_id_idx', 'work_orders_photo_status_idx')"))
    assert.are.equal("1", sql1("SELECT count(*) FROM pg_constraint "
      .. "WHERE conname = 'messages_attachment_count_check'"))
    -- deployment history: the last stable one is v1's
    assert.are.equal(E.DRILL_APP_V1_SHA .. "|" .. E.DRILL_VERCEL_V1_DEPLOYMENT, sql1(
      "SELECT git_sha || '|' || vercel_deployment_id FROM deployment_history "
      .. "WHERE status = 'stable' ORDER BY deployed_at DESC LIMIT 1"))
    assert.are.equal("t", sql1("SELECT enabled FROM feature_flags WHERE name = 'photo_first'"))
  end)

  it("#pg blocks photo updates by trigger once the photo_first flag is off", function()
    -- flag on: allowed; flag off: SQLSTATE P0001; both rolled back
    local ok = psql([[BEGIN;
      UPDATE work_orders SET photo_url = 'https://x/1.jpg' WHERE id = 1;
      ROLLBACK;]], { check = false })
    assert.are.equal(0, ok.code, ok.stderr)
    local r = psql([[BEGIN;
      UPDATE feature_flags SET enabled = false WHERE name = 'photo_first';
      UPDATE work_orders SET title = title || ' (checked)' WHERE id = 2;
      UPDATE work_orders SET photo_url = 'https://x/2.jpg' WHERE id = 2;
      ROLLBACK;]], { check = false })
    assert.are_not.equal(0, r.code)
    assert.matches("read%-only while feature photo_first is off", r.stderr)
    assert.are.equal("t", sql1("SELECT enabled FROM feature_flags WHERE name = 'photo_first'"))
  end)

  it("#pg can go back to v1: down-migrations newest first, and the pre-deploy dump", function()
    local downs = {}
    for _, name in ipairs(fs.list(E.DRILL_MIGRATIONS_DIR)) do
      local v = name:match("^(%d+)_.*%.down%.sql$")
      if v and tonumber(v) > tonumber(E.DRILL_SCHEMA_V1) then downs[#downs + 1] = name end
    end
    table.sort(downs, function(a, b) return a > b end)
    assert.are.equal(4, #downs)
    local script = { "\\set ON_ERROR_STOP on", "BEGIN;" }
    for _, d in ipairs(downs) do script[#script + 1] = ("\\i '%s/%s'"):format(E.DRILL_MIGRATIONS_DIR, d) end
    script[#script + 1] = [[SELECT concat_ws(' ',
      (SELECT count(*) FROM information_schema.columns
        WHERE table_name = 'work_orders' AND column_name LIKE 'photo%'),
      (SELECT count(*) FROM information_schema.columns
        WHERE table_name = 'messages' AND column_name = 'attachment_count'),
      (SELECT count(*) FROM information_schema.tables WHERE table_name = 'message_attachments'),
      (SELECT count(*) FROM pg_trigger WHERE tgname = 'work_orders_photo_guard'),
      (SELECT count(*) FROM work_orders), (SELECT count(*) FROM messages));]]
    script[#script + 1] = "ROLLBACK;"
    local f = tmp .. "/downs.sql"
    fs.write(f, table.concat(script, "\n") .. "\n")
    local r = proc.run({ E.DRILL_PG_BINDIR .. "/psql", "-X", "-At", "-q", "-d", rbe.secret(E.DRILL_PG_URL),
      "-f", f }, { check = false })
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("0 0 0 0 2700 5400", (r.stdout:gsub("\n$", "")))
    -- rolled back: still at v2
    assert.are.equal("1", sql1("SELECT count(*) FROM pg_trigger WHERE tgname = 'work_orders_photo_guard'"))
    -- the dump taken before the v2 migrations has v1's tables only
    local list = proc.output { E.DRILL_PG_BINDIR .. "/pg_restore", "--list", E.DRILL_PREDEPLOY_DUMP }
    assert.matches("TABLE public work_orders ", list)
    assert.matches("TABLE public schema_migrations ", list)
    assert.is_nil(list:find("message_attachments", 1, true))
  end)

  it("#redis holds thousands of cache keys of several patterns", function()
    assert.are.equal(384, count_keys("cache:user:*"))
    assert.are.equal(12, count_keys("cache:org:*"))
    assert.is_true(count_keys("cache:work_order:*") >= 800)
    assert.are.equal(1800, count_keys("gemini:*"))
    assert.are.equal(500, count_keys("session:*"))
    assert.is_true(tonumber(redis("DBSIZE")) >= 3000)
    local session = redis("EVAL", "return redis.call('KEYS', 'session:*')[1]", "0")
    assert.are.equal("hash", redis("TYPE", session))
    for _, p in ipairs { "cache:user:*", "gemini:*", "session:*" } do
      assert.is_truthy(E.DRILL_CACHE_PATTERNS:find(p, 1, true))
    end
  end)

  it("#redis runs a real BullMQ worker that processes every job exactly once", function()
    -- jobs flow on their own: the producer adds, the worker processes
    for _, q in ipairs(queues()) do
      local n0 = processed(q)
      wait_until(q .. " processing", 10, function() return processed(q) >= n0 + 2 end)
    end
    -- pausing the queues through the app stops processing; jobs wait
    local res = http("POST", E.DRILL_APP_URL .. "/api/queue/pause-all")
    assert.are.equal(200, res.status)
    assert.is_true(res.body.queues[E.DRILL_QUEUE].is_paused)
    local frozen = processed(E.DRILL_QUEUE)
    wait_until("jobs waiting in a paused queue", 10, function()
      local s = http("GET", E.DRILL_APP_URL .. "/api/queue/stats").body.queues[E.DRILL_QUEUE]
      return s.waiting + s.paused >= 2
    end)
    assert.are.equal(frozen, processed(E.DRILL_QUEUE))
    -- resume, stop producing, and let the worker drain
    res = http("POST", E.DRILL_APP_URL .. "/api/queue/resume-all")
    assert.are.equal(200, res.status)
    assert.is_false(res.body.queues[E.DRILL_QUEUE].is_paused)
    redis("SET", "drill:producer:paused", "1")
    rbe.sleep(0.4) -- an add already under way lands
    for _, q in ipairs(queues()) do
      wait_until(q .. " drained", 15, function() return processed(q) == produced(q) end)
      assert.are.equal("", redis("SDIFF", "drill:produced:" .. q, "drill:processed:" .. q))
      assert.are.equal("0", (redis("GET", "drill:duplicates:" .. q):gsub("^$", "0")))
      assert.is_true(processed(q) >= 3)
    end
    redis("DEL", "drill:producer:paused")
    local p0 = produced(E.DRILL_QUEUE)
    wait_until("production restarting", 10, function() return produced(E.DRILL_QUEUE) > p0 end)
  end)

  it("serves the app at v2 under pm2: health degraded, error log growing", function()
    local h = http("GET", E.DRILL_APP_URL .. "/health")
    assert.are.equal(200, h.status)
    assert.are.equal("v2", h.body.version)
    assert.are.equal("degraded", h.body.status)
    assert.are.equal("degraded", h.body.api)
    assert.are.equal("ok", h.body.database)
    assert.are.equal("ok", h.body.redis)
    local v = http("GET", E.DRILL_APP_URL .. "/api/version").body
    assert.are.equal(E.DRILL_APP_V2_SHA, v.commit)
    assert.is_true(v.features.photo_first)
    local m = http("GET", E.DRILL_APP_URL .. "/api/messages/4802").body
    assert.matches("^https://", m.mediaUrl)
    -- the error log grows by itself
    local function errors()
      local n = 0
      for line in fs.lines(E.DRILL_APP_LOG) do
        if line:find(" ERROR ", 1, true) then n = n + 1 end
      end
      return n
    end
    local e0 = errors()
    wait_until("new ERROR lines", 10, function() return errors() >= e0 + 2 end)
    local metrics = http("GET", E.DRILL_APP_URL .. "/api/metrics").body
    assert.is_true(metrics.requests > 0)
    assert.is_true(metrics.error_rate > 0.05)
    -- pm2 (with the drill's own PM2_HOME) runs it
    local env = { PM2_HOME = E.DRILL_PM2_HOME }
    local list = json.decode(proc.output({ "node", E.DRILL_PM2, "jlist" }, { env = env }))
    assert.are.equal(1, #list)
    assert.are.equal(E.DRILL_APP_NAME, list[1].name)
    assert.are.equal("online", list[1].pm2_env.status)
    assert.is_false(dead(list[1].pid))
    -- the git repository: two tags, HEAD at v2, built
    local git = function(...) return proc.output({ "git", ... }, { cwd = E.DRILL_APP_DIR }) end
    assert.are.equal("v1\nv2", git("tag", "--list"))
    assert.are.equal(E.DRILL_APP_V2_SHA, git("rev-parse", "HEAD"))
    assert.are.equal(E.DRILL_APP_V1_SHA, git("rev-parse", "v1^{commit}"))
    assert.are.equal("", git("status", "--porcelain"))
    assert.is_true(fs.exists(E.DRILL_APP_DIR .. "/dist/server.js"))
    -- .env has the v2 flag on; .env.backup is v1's, without it
    assert.matches("\nFEATURE_PHOTO_FIRST=true\n", fs.read(E.DRILL_ENV_FILE))
    local backup = fs.read(E.DRILL_ENV_BACKUP)
    assert.is_nil(backup:find("FEATURE_PHOTO_FIRST", 1, true))
    assert.matches("\nDATABASE_URL=", backup)
  end)

  it("fakes Vercel: production at v2, token enforced, async promote", function()
    -- auth
    local r = vercel("GET", "/v9/projects/" .. E.DRILL_PROJECT, { bearer = false })
    assert.are.equal(401, r.status)
    r = vercel("GET", "/v9/projects/" .. E.DRILL_PROJECT, { bearer = "wrong" })
    assert.are.equal(401, r.status)
    assert.are.equal("forbidden", r.body.error.code)
    -- the project: production is the v2 deployment, built from the v2 tag
    local p = vercel("GET", "/v9/projects/" .. E.DRILL_PROJECT).body
    assert.are.equal(E.DRILL_PROJECT_ID, p.id)
    assert.are.equal(E.DRILL_VERCEL_V2_DEPLOYMENT, p.targets.production.id)
    assert.are.equal(E.DRILL_APP_V2_SHA, p.targets.production.meta.githubCommitSha)
    assert.are.equal(json.null, p.lastAliasRequest)
    -- the deployment list, page by page
    local seen, until_, pages = {}, nil, 0
    repeat
      local q = "/v6/deployments?projectId=" .. E.DRILL_PROJECT_ID .. "&limit=2"
        .. (until_ and ("&until=" .. until_) or "")
      local page = vercel("GET", q).body
      pages = pages + 1
      for _, d in ipairs(page.deployments) do seen[#seen + 1] = d end
      until_ = page.pagination.next
    until until_ == json.null or pages > 10
    assert.are.equal(3, pages)
    assert.are.equal(6, #seen)
    assert.are.equal(E.DRILL_VERCEL_V2_DEPLOYMENT, seen[1].uid)
    local ready = vercel("GET", "/v6/deployments?target=production&state=READY").body.deployments
    assert.are.equal(4, #ready)
    assert.are.equal(E.DRILL_VERCEL_V1_DEPLOYMENT, ready[2].uid)
    assert.are.equal(E.DRILL_APP_V1_SHA, ready[2].meta.githubCommitSha)
    -- 404 for an unknown deployment
    r = vercel("POST", "/v10/projects/" .. E.DRILL_PROJECT_ID .. "/promote/dpl_missing")
    assert.are.equal(404, r.status)
    assert.are.equal("deployment_not_found", r.body.error.code)
    -- a promote job told to fail: pending, then failed, production unchanged
    assert.are.equal(200, vercel("POST", "/_fail_next_promote").status)
    r = vercel("POST", "/v10/projects/" .. E.DRILL_PROJECT_ID .. "/promote/" .. E.DRILL_VERCEL_V1_DEPLOYMENT)
    assert.are.equal(202, r.status)
    p = vercel("GET", "/v9/projects/" .. E.DRILL_PROJECT_ID).body
    assert.are.equal("pending", p.lastAliasRequest.jobStatus)
    assert.are.equal("promote", p.lastAliasRequest.type)
    wait_until("promote job failing", 10, function()
      return vercel("GET", "/v9/projects/" .. E.DRILL_PROJECT_ID).body.lastAliasRequest.jobStatus == "failed"
    end)
    p = vercel("GET", "/v9/projects/" .. E.DRILL_PROJECT_ID).body
    assert.are.equal(E.DRILL_VERCEL_V2_DEPLOYMENT, p.targets.production.id)
    -- a real promote: pending -> succeeded, production at v1, aliases moved
    r = vercel("POST", "/v10/projects/" .. E.DRILL_PROJECT_ID .. "/promote/" .. E.DRILL_VERCEL_V1_DEPLOYMENT)
    assert.are.equal(202, r.status)
    wait_until("promote job", 10, function()
      local x = vercel("GET", "/v9/projects/" .. E.DRILL_PROJECT_ID).body
      return x.lastAliasRequest.jobStatus == "succeeded"
    end)
    p = vercel("GET", "/v9/projects/" .. E.DRILL_PROJECT_ID).body
    assert.are.equal(E.DRILL_VERCEL_V1_DEPLOYMENT, p.targets.production.id)
    assert.are.same({ E.DRILL_VERCEL_ALIAS, "drill-app.vercel.app" }, p.targets.production.alias)
    -- alias assignment: moving it back answers with the old deployment;
    -- assigning it again conflicts
    r = vercel("POST", "/v2/deployments/" .. E.DRILL_VERCEL_V2_DEPLOYMENT .. "/aliases",
      { json = { alias = E.DRILL_VERCEL_ALIAS } })
    assert.are.equal(200, r.status)
    assert.are.equal(E.DRILL_VERCEL_V1_DEPLOYMENT, r.body.oldDeploymentId)
    assert.are.equal(E.DRILL_VERCEL_ALIAS, r.body.alias)
    r = vercel("POST", "/v2/deployments/" .. E.DRILL_VERCEL_V2_DEPLOYMENT .. "/aliases",
      { json = { alias = E.DRILL_VERCEL_ALIAS } })
    assert.are.equal(409, r.status)
    -- a rollback job puts production back on v2 (201, asynchronous)
    r = vercel("POST", "/v1/projects/" .. E.DRILL_PROJECT_ID .. "/rollback/" .. E.DRILL_VERCEL_V2_DEPLOYMENT)
    assert.are.equal(201, r.status)
    wait_until("rollback job", 10, function()
      local x = vercel("GET", "/v9/projects/" .. E.DRILL_PROJECT_ID).body
      return x.lastAliasRequest.type == "rollback" and x.lastAliasRequest.jobStatus == "succeeded"
        and x.targets.production.id == E.DRILL_VERCEL_V2_DEPLOYMENT
    end)
    -- every call was recorded, the unauthorized ones too
    local calls = vercel("GET", "/_calls").body.calls
    assert.is_true(#calls >= 12)
    assert.is_false(calls[1].authorized)
    assert.are.equal(401, calls[1].status)
    local promotes = 0
    for _, c in ipairs(calls) do
      if c.method == "POST" and c.path:find("/promote/", 1, true) then promotes = promotes + 1 end
    end
    assert.are.equal(3, promotes)
  end)

  local app_pid = nil   -- the app's pid after the restart below

  it("can be rolled back by hand: checkout v1, build, .env.backup, pm2 restart", function()
    local env = { PM2_HOME = E.DRILL_PM2_HOME }
    local dir = E.DRILL_APP_DIR
    proc.run({ "git", "checkout", "-q", E.DRILL_APP_V1_TAG }, { cwd = dir })
    proc.run({ "npm", "install", "--no-audit", "--no-fund" }, { cwd = dir, timeout = "60s" })
    proc.run({ "npm", "run", "build" }, { cwd = dir, timeout = "60s" })
    fs.write(E.DRILL_ENV_FILE, fs.read(E.DRILL_ENV_BACKUP))
    proc.run({ "node", E.DRILL_PM2, "restart", E.DRILL_APP_NAME }, { env = env, timeout = "30s" })
    -- while pm2 restarts it, the app may refuse, still answer as v2, or
    -- answer as v1 before its database and Redis clients are connected
    local h
    wait_until("v1 answering and healthy", 15, function()
      local ok, r = pcall(http, "GET", E.DRILL_APP_URL .. "/health")
      if ok and type(r.body) == "table" and r.body.version == "v1" then h = r end
      return h and h.body.status == "ok"
    end)
    assert.are.equal("ok", h.body.status)
    assert.are.equal(E.DRILL_APP_V1_SHA, h.body.commit)
    assert.are.equal("", proc.output({ "git", "status", "--porcelain" }, { cwd = dir }))
    local list = json.decode(proc.output({ "node", E.DRILL_PM2, "jlist" }, { env = env }))
    app_pid = list[1].pid
    assert.are_not.equal(tonumber(E.DRILL_PID_APP), app_pid)
    -- v1 writes no errors
    local size = fs.stat(E.DRILL_APP_LOG).size
    rbe.sleep(1.2)
    local added = fs.read(E.DRILL_APP_LOG):sub(size + 1)
    assert.is_nil(added:find(" ERROR ", 1, true))
  end)

  it("stops every process and removes its state with down, twice", function()
    local pids = { APP = app_pid }
    for _, k in ipairs { "DRILL_PID_PG", "DRILL_PID_REDIS", "DRILL_PID_PM2",
        "DRILL_PID_WORKER", "DRILL_PID_TRAFFIC", "DRILL_PID_VERCEL" } do
      local pid = tonumber(E[k])
      assert.is_truthy(pid, k)
      assert.is_false(dead(pid), k .. " is not running")
      pids[k] = pid
    end
    assert.is_true(#owned(state) >= 5)
    local t0 = rbe.now()
    local r = drill("down.lua", state)
    assert.are.equal(0, r.code, r.stderr)
    assert.is_true(rbe.now() - t0 < 30)
    for k, pid in pairs(pids) do
      wait_until(k .. " gone", 5, function() return dead(pid) end)
    end
    assert.are.same({}, owned(state))
    assert.is_false(fs.exists(state))
    r = drill("down.lua", state)
    assert.are.equal(0, r.code, r.stderr)
  end)

  it("cleans up after an up that fails half-way", function()
    -- kept for a post-mortem (DRILL_KEEP=1), then taken down
    local kept = tmp .. "/kept"
    local r = drill("up.lua", kept, { DRILL_TEST_FAIL = "app", DRILL_KEEP = "1" })
    assert.are.equal(1, r.code)
    assert.matches("DRILL_TEST_FAIL=app", r.stderr)
    assert.is_true(fs.exists(kept .. "/servers/env"))
    assert.is_true(#owned(kept) >= 3)  -- pm2, app, worker, fake vercel
    local pg = tonumber(read_kv(kept .. "/servers/pids").pg)
    r = drill("down.lua", kept)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({}, owned(kept))
    wait_until("postgres gone", 5, function() return dead(pg) end)
    assert.is_false(fs.exists(kept))
    -- without DRILL_KEEP, up stops what it started itself
    local failed = tmp .. "/failed"
    r = drill("up.lua", failed, { DRILL_TEST_FAIL = "database" })
    assert.are.equal(1, r.code)
    assert.matches("stopping what was started", r.stderr)
    assert.are.same({}, owned(failed))
    assert.is_false(fs.exists(failed))
  end)

  it("refuses a state dir it did not make", function()
    local other = tmp .. "/other"
    fs.mkdir(other)
    fs.write(other .. "/precious.txt", "keep me\n")
    local r = drill("up.lua", other)
    assert.are.equal(1, r.code)
    assert.matches("not made by drill/up.lua", r.stderr)
    r = drill("down.lua", other)
    assert.are.equal(1, r.code)
    assert.matches("not made by drill/up.lua", r.stderr)
    assert.are.equal("keep me\n", fs.read(other .. "/precious.txt"))
    r = drill("down.lua", tmp .. "/never-existed")
    assert.are.equal(0, r.code)
  end)
end)
