-- drill/up.lua: start the drill environment, a throwaway copy of a typical
-- stack at its bad "v2" release, for playbooks to roll back.
--
--   build/bin/rbe drill/up.lua STATE_DIR     start; writes STATE_DIR/drill.env
--   build/bin/rbe drill/down.lua STATE_DIR   stop everything, remove STATE_DIR
--
-- Everything listens on 127.0.0.1 on random ports and lives in STATE_DIR:
-- PostgreSQL and Redis (tests/fixtures/servers.sh), the app's git repository,
-- pm2's home, the fake Vercel API's state, logs and the pre-deploy dump.
-- See drill/README.md for what is in it and the keys of drill.env.
--
-- Independent steps run concurrently (servers / git repo; database / Redis /
-- fake Vercel / worker; app / traffic).  On failure up prints why, stops
-- what it started (drill/down.lua's code) and exits 1; set DRILL_KEEP=1 to
-- keep the state directory for a post-mortem instead.
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local json = require "rbe.json"

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
if here:sub(1, 1) ~= "/" then here = rbe.whoami().cwd .. "/" .. here end
local D = dofile(here .. "/lib.lua")
local log = D.log

local STATE = D.abspath(arg and arg[1])
if not STATE or STATE == "/" then
  io.stderr:write("usage: rbe drill/up.lua STATE_DIR\n")
  os.exit(2)
end

---------------------------------------------------------------------------
-- what the drill is made of

local DRILL = D.DRILL_DIR
local PROJECT = "drill-app"
local APP_NAME = "drill-app"           -- pm2 process name
local ALIASES = { "drill-app.example.com", "drill-app.vercel.app" }
local QUEUES = { "notifications", "photo-processing" }
local SCHEMA_V1 = 20240129120000       -- last v1 migration
local CACHE_PATTERNS = { "cache:user:*", "cache:org:*", "cache:work_order:*",
                         "gemini:*", "session:*" }
local V2_AGE = 3 * 3600                -- v2 was deployed 3 hours ago

local function rand(n, alphabet)
  alphabet = alphabet or "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
  local t = {}
  for i = 1, n do
    local k = math.random(#alphabet)
    t[i] = alphabet:sub(k, k)
  end
  return table.concat(t)
end
local function hex(n) return rand(n, "0123456789abcdef") end

local NOW = os.time()
local V2_EPOCH = NOW - V2_AGE
local TOKEN = "drill_" .. rand(24)
local PG_PASSWORD = "drill-" .. rand(16)
local PROJECT_ID = "prj_" .. rand(28)
local DPL = {
  v08 = "dpl_" .. rand(28), v09 = "dpl_" .. rand(28), v1 = "dpl_" .. rand(28),
  preview = "dpl_" .. rand(28), err = "dpl_" .. rand(28), v2 = "dpl_" .. rand(28),
}
local SHA = { v08 = hex(40), v09 = hex(40), err = hex(40) }

local P = {                            -- paths in the state directory
  app = STATE .. "/app",
  logs = STATE .. "/logs",
  run = STATE .. "/run",
  backups = STATE .. "/backups",
  vercel = STATE .. "/vercel",
  servers = STATE .. "/servers",
  pids = STATE .. "/pids",
  state = STATE .. "/state",
}

-- run f(...), log how long it took, return its results
local function timed(name, f, ...)
  local t = rbe.now()
  local r = table.pack(f(...))
  log("%-22s %6.0f ms", name, (rbe.now() - t) * 1000)
  return table.unpack(r, 1, r.n)
end

local function record_pid(key, pid)
  D.append_kv(P.pids, key, pid)
end

local function tail(path, n)
  if not fs.exists(path) then return "(no " .. path .. ")" end
  local lines = {}
  for line in fs.lines(path) do
    lines[#lines + 1] = line
    if #lines > (n or 20) then table.remove(lines, 1) end
  end
  return table.concat(lines, "\n")
end

local function fail(fmt, ...)
  error(("drill: " .. fmt):format(...), 0)
end

-- DRILL_TEST_FAIL=<step> makes up fail right after that step (servers,
-- database, app, traffic): the drill's own spec uses it to check that a
-- half-started drill is cleaned up
local function checkpoint(step)
  if os.getenv("DRILL_TEST_FAIL") == step then
    fail("DRILL_TEST_FAIL=%s: failing on purpose", step)
  end
end

---------------------------------------------------------------------------
-- steps

local function check_prerequisites()
  for _, p in ipairs { D.SERVERS_SH, DRILL .. "/fake-vercel.js", DRILL .. "/worker.js" } do
    if not fs.exists(p) then fail("missing %s", p) end
  end
  for _, m in ipairs { "bullmq", "ioredis", "pg", "pm2" } do
    if not fs.exists(D.NODE_MODULES .. "/" .. m .. "/package.json") then
      fail("npm package %s is not installed in %s; run tests/fixtures/npm-install.sh "
        .. "(or make deps)", m, D.NODE_MODULES)
    end
  end
  for _, tool in ipairs { "node", "git", "setsid" } do
    local ok = rbe.try(proc.run, { tool, "--version" }, { stdout = "null", stderr = "null" })
    if not ok then fail("%s not found in PATH (run make deps)", tool) end
  end
end

local function prepare_state_dir()
  if fs.exists(STATE) then
    if fs.exists(STATE .. "/" .. D.MARKER) then
      log("%s holds an earlier drill; taking it down first", STATE)
      D.down(STATE)
    elseif #fs.list(STATE) > 0 then
      fail("%s exists, is not empty and was not made by drill/up.lua; not touching it", STATE)
    end
  end
  fs.mkdir(STATE, { mode = "0755" })
  fs.write(STATE .. "/" .. D.MARKER, "drill state directory (drill/up.lua)\n")
  for _, d in ipairs { P.logs, P.run, P.backups, P.vercel } do fs.mkdir(d) end
  fs.write(P.pids, "")
  fs.write(P.state, "")
end

local function start_servers()
  local r = proc.run({ D.SERVERS_SH, "start", P.servers },
    { stderr = "stdout", check = false, timeout = "90s" })
  if r.code ~= 0 then fail("servers.sh start failed:\n%s", r.stdout) end
  local env = D.read_kv(P.servers .. "/env")
  local pids = D.read_kv(P.servers .. "/pids")
  if not env.RBE_TEST_PG_PORT or not env.RBE_TEST_REDIS_PORT then
    fail("servers.sh wrote no ports in %s/env", P.servers)
  end
  return env, pids
end

-- the app's git repository: v1 and v2 tagged, built at v2
local function create_repo()
  local t_v1, t_v2 = NOW - 10 * 86400, V2_EPOCH - 1800
  local base = {
    GIT_CONFIG_NOSYSTEM = "1", GIT_CONFIG_GLOBAL = "/dev/null",
    GIT_AUTHOR_NAME = "Maya Kim", GIT_AUTHOR_EMAIL = "maya.kim@drill.example",
    GIT_COMMITTER_NAME = "Drill CI", GIT_COMMITTER_EMAIL = "ci@drill.example",
  }
  local function git(args, when)
    local env = {}
    for k, v in pairs(base) do env[k] = v end
    if when then
      env.GIT_AUTHOR_DATE = ("@%d +0000"):format(when)
      env.GIT_COMMITTER_DATE = env.GIT_AUTHOR_DATE
    end
    local argv = { "git" }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    return proc.output(argv, { cwd = P.app, env = env })
  end
  local function copy(from)
    proc.run { "cp", "-R", DRILL .. "/app/" .. from .. "/.", P.app .. "/" }
  end
  fs.mkdir(P.app)
  git { "init", "-q", "-b", "main" }
  git { "config", "user.name", "Drill Operator" }
  git { "config", "user.email", "oncall@drill.example" }
  git { "config", "advice.detachedHead", "false" }
  copy("common"); copy("v1")
  git { "add", "-A" }
  git({ "commit", "-q", "-m", "Release 1.4.0" }, t_v1)
  git({ "tag", "-a", "v1", "-m", "v1: release 1.4.0" }, t_v1)
  copy("v2")
  git { "add", "-A" }
  git({ "commit", "-q", "-m", "Release 2.0.0: photo-first work orders, message attachments" }, t_v2)
  git({ "tag", "-a", "v2", "-m", "v2: release 2.0.0" }, t_v2)
  local v1 = git { "rev-parse", "v1^{commit}" }
  local v2 = git { "rev-parse", "v2^{commit}" }
  proc.run({ "node", "build.js" }, { cwd = P.app, stdout = "null" })
  return v1, v2
end

-- a free port for the app, which keeps it across restarts.  Picked like
-- servers.sh picks (20000-31999, below the kernel's ephemeral range, so
-- the fake Vercel's port 0 can never be handed the same one) once
-- PostgreSQL and Redis hold theirs.
local function free_port()
  local port = tonumber(proc.output { "node", "-e", [[
const net = require('net');
(function attempt(n) {
  const p = 20000 + Math.floor(Math.random() * 12000);
  const s = net.createServer();
  s.once('error', () => { if (n > 0) attempt(n - 1); else process.exit(1); });
  s.listen(p, '127.0.0.1', () => { console.log(p); s.close(); });
})(20);]] })
  if not port then fail("no free port for the app") end
  return port
end

local function migrations()
  local dir = DRILL .. "/migrations"
  local list = {}
  for _, name in ipairs(fs.list(dir)) do
    local v, title = name:match("^(%d+)_(.+)%.up%.sql$")
    if v then list[#list + 1] = { version = math.tointeger(tonumber(v)), title = title,
                                  path = dir .. "/" .. name } end
  end
  table.sort(list, function(a, b) return a.version < b.version end)
  return list
end

-- a psql script applying `list` the way golang-migrate does (dirty while
-- running, one transaction per file), then running `seed`
local function migrate_script(list, seed)
  local out = {
    "\\set ON_ERROR_STOP on", "\\set QUIET on", "SET client_min_messages = warning;",
    "CREATE TABLE IF NOT EXISTS schema_migrations "
      .. "(version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL);",
  }
  local function set_version(v, dirty)
    out[#out + 1] = ("BEGIN; TRUNCATE schema_migrations; "
      .. "INSERT INTO schema_migrations (version, dirty) VALUES (%d, %s); COMMIT;")
      :format(v, dirty and "true" or "false")
  end
  for _, m in ipairs(list) do
    set_version(m.version, true)
    out[#out + 1] = "BEGIN;"
    out[#out + 1] = ("\\i '%s'"):format(m.path)
    out[#out + 1] = "COMMIT;"
    set_version(m.version, false)
  end
  out[#out + 1] = ("\\i '%s'"):format(seed)
  return table.concat(out, "\n") .. "\n"
end

local function setup_database(srv, sha)
  local bin = srv.RBE_TEST_PG_BINDIR
  local port = srv.RBE_TEST_PG_PORT
  local admin = srv.RBE_TEST_PG_ADMIN_URL
  local url = ("postgresql://drill:%s@127.0.0.1:%s/drill"):format(PG_PASSWORD, port)
  local function psql(target, args)
    local argv = { bin .. "/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", rbe.secret(target) }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    return proc.run(argv, { timeout = "60s" })
  end
  psql(admin, { "-c", ("CREATE ROLE drill LOGIN PASSWORD '%s'"):format(PG_PASSWORD),
                "-c", "CREATE DATABASE drill OWNER drill" })
  local v1, v2 = {}, {}
  for _, m in ipairs(migrations()) do
    if m.version <= SCHEMA_V1 then v1[#v1 + 1] = m else v2[#v2 + 1] = m end
  end
  local vars = {
    "-v", "v2_epoch=" .. V2_EPOCH, "-v", "v1_sha=" .. sha.v1, "-v", "v2_sha=" .. sha.v2,
    "-v", "sha_v08=" .. SHA.v08, "-v", "sha_v09=" .. SHA.v09, "-v", "sha_err=" .. SHA.err,
  }
  for k, id in pairs(DPL) do vars[#vars + 1] = "-v"; vars[#vars + 1] = "dpl_" .. k .. "=" .. id end
  local function apply(name, list, seed)
    local script = P.run .. "/" .. name .. ".sql"
    fs.write(script, migrate_script(list, DRILL .. "/seed/" .. seed))
    local args = { table.unpack(vars) }
    args[#args + 1] = "-f"
    args[#args + 1] = script
    psql(url, args)
  end
  apply("migrate-v1", v1, "v1.sql")
  -- the dump a "restore from the pre-deploy backup" rollback restores
  local dump = P.backups .. "/predeploy-v1.dump"
  proc.run({ bin .. "/pg_dump", "-Fc", "-f", dump, "-d", rbe.secret(url) }, { timeout = "60s" })
  apply("migrate-v2", v2, "v2.sql")
  local got = proc.output({ bin .. "/psql", "-X", "-At", "-d", rbe.secret(url), "-c",
    "SELECT version || ' ' || dirty FROM schema_migrations" })
  local want = ("%d false"):format(v2[#v2].version)
  if got ~= want then fail("schema_migrations is '%s', expected '%s'", got, want) end
  return {
    url = url, admin = admin, port = port, bin = bin, dump = dump,
    v1 = SCHEMA_V1, v2 = v2[#v2].version,
  }
end

-- cache keys of several patterns, written by one server-side script
local REDIS_SEED = [[
local now = tonumber(ARGV[1])
local n = 0
local roles = { 'admin', 'dispatcher', 'technician' }
for i = 1, 384 do
  local org = math.floor((i - 1) / 30) % 12 + 1
  redis.call('SET', 'cache:user:' .. i, cjson.encode({ id = i, organization_id = org,
    role = roles[(i % 3) + 1], cached_at = now }), 'EX', 86400)
  n = n + 1
end
for o = 1, 12 do
  redis.call('SET', 'cache:org:' .. o, cjson.encode({ id = o, plan = 'standard', users = 30,
    cached_at = now }), 'EX', 86400)
  n = n + 1
end
for i = 1, 800 do
  redis.call('SET', 'cache:work_order:' .. i, cjson.encode({ id = i, organizationId = (i - 1) % 12 + 1,
    status = 'done', cachedBy = 'v1' }), 'EX', 3600)
  n = n + 1
end
for i = 1, 1500 do
  redis.call('SET', 'gemini:summary:wo:' .. i, cjson.encode({ model = 'gemini-1.5-flash',
    summary = 'Technician visit summary for work order ' .. i, tokens = 120 + i % 80 }), 'EX', 604800)
  n = n + 1
end
for i = 2401, 2700 do
  redis.call('SET', 'gemini:caption:photo:' .. i, cjson.encode({ model = 'gemini-1.5-pro-vision',
    caption = 'Photo of equipment at work order ' .. i, feature = 'photo_first' }), 'EX', 604800)
  n = n + 1
end
for i = 1, 500 do
  local key = 'session:' .. redis.sha1hex('drill-session-' .. i)
  redis.call('HSET', key, 'user_id', tostring((i * 7) % 384 + 1), 'created_at', tostring(now - i * 60),
    'user_agent', 'FieldApp/2.0 (Android 14)')
  redis.call('EXPIRE', key, 86400)
  n = n + 1
end
redis.call('SET', 'cache:flags',
  cjson.encode({ photo_first = true, message_attachments = true }), 'EX', 86400)
return n + 1
]]

local function seed_redis(srv)
  local out = proc.output { "redis-cli", "-h", "127.0.0.1", "-p", srv.RBE_TEST_REDIS_PORT,
    "EVAL", REDIS_SEED, "0", tostring(NOW) }
  local n = tonumber(out)
  if not n then fail("seeding Redis failed: %s", out) end
  return n
end

-- start a detached node process (own session, survives rbe); returns its
-- pid once it wrote READY_FILE (a JSON object, also returned)
local function start_node(name, script, env, wait)
  local pidfile = P.run .. "/" .. name .. ".pid"
  local ready = P.run .. "/" .. name .. ".ready"
  local logf = P.logs .. "/" .. name .. ".log"
  local e = { RBE_DRILL_OWNER = STATE, NODE_PATH = D.NODE_MODULES, READY_FILE = ready,
              DRILL_PIDFILE = pidfile, DRILL_SCRIPT = script, DRILL_LOG = logf }
  for k, v in pairs(env) do e[k] = v end
  proc.run({ "setsid", "-f", "/bin/sh", "-c",
    'exec >>"$DRILL_LOG" 2>&1 </dev/null; echo $$ >"$DRILL_PIDFILE"; exec node "$DRILL_SCRIPT"' },
    { env = e, stdout = "null", stderr = "null", timeout = "10s" })
  local deadline = rbe.now() + (wait or 15)
  local pid
  while rbe.now() < deadline do
    if not pid and fs.exists(pidfile) then
      pid = tonumber(fs.read(pidfile):match("%d+"))
      if pid then record_pid((name:upper():gsub("-", "_")), pid) end
    end
    if fs.exists(ready) then
      local ok, info = pcall(json.decode, fs.read(ready))
      if ok and type(info) == "table" and info.pid then return info.pid, info end
    end
    if pid and not D.alive(pid) then
      fail("%s (pid %d) exited during start; its log:\n%s", name, pid, tail(logf))
    end
    rbe.sleep(0.02)
  end
  fail("%s did not become ready in %ds; its log:\n%s", name, wait or 15, tail(logf))
end

local function vercel_seed(sha)
  local function dep(uid, version, sha_, created, ready_state, target, ref, msg)
    return {
      uid = uid, name = PROJECT, url = ("%s-%s-drill.vercel.app"):format(PROJECT, uid:sub(5, 13):lower()),
      created = created * 1000, buildingAt = created * 1000 + 2000,
      ready = ready_state == "READY" and created * 1000 + 65000 or json.null,
      readyState = ready_state, target = target or json.null, source = "git",
      aliasAssigned = (ready_state == "READY" and target == "production")
        and created * 1000 + 70000 or json.null,
      creator = { uid = "user_drillci", username = "drill-ci", email = "ci@drill.example" },
      meta = {
        githubCommitSha = sha_, githubCommitRef = ref or "main",
        githubCommitMessage = msg, githubOrg = "drill", githubRepo = PROJECT,
        appVersion = version,
      },
    }
  end
  return {
    token = TOKEN,
    project = {
      id = PROJECT_ID, name = PROJECT,
      link = { type = "github", org = "drill", repo = PROJECT, productionBranch = "main" },
    },
    aliases = ALIASES,
    production = DPL.v2,
    deployments = {
      dep(DPL.v2, "2.0.0", sha.v2, V2_EPOCH, "READY", "production", "main",
          "Release 2.0.0: photo-first work orders, message attachments"),
      dep(DPL.err, "2.0.0-rc1", SHA.err, NOW - 5 * 86400, "ERROR", "production", "main",
          "Release 2.0.0-rc1"),
      dep(DPL.preview, "2.0.0-beta", sha.v2, NOW - 6 * 86400, "READY", nil,
          "feature/photo-first", "photo-first: take the photo before the form"),
      dep(DPL.v1, "1.4.0", sha.v1, NOW - 10 * 86400, "READY", "production", "main", "Release 1.4.0"),
      dep(DPL.v09, "1.3.0", SHA.v09, NOW - 30 * 86400, "READY", "production", "main", "Release 1.3.0"),
      dep(DPL.v08, "1.2.0", SHA.v08, NOW - 45 * 86400, "READY", "production", "main", "Release 1.2.0"),
    },
  }
end

local function start_vercel(sha)
  fs.write(P.vercel .. "/seed.json", json.encode(vercel_seed(sha)))
  local pid, info = start_node("fake-vercel", DRILL .. "/fake-vercel.js", {
    SEED_FILE = P.vercel .. "/seed.json", STATE_FILE = P.vercel .. "/state.json", PORT = "0",
  })
  return pid, ("http://127.0.0.1:%d"):format(info.port)
end

local function write_app_env(db, srv, port)
  local lines = {
    "# drill-app configuration",
    "NODE_ENV=production",
    "HOST=127.0.0.1",
    "PORT=" .. port,
    "DATABASE_URL=" .. db.url,
    "REDIS_URL=" .. srv.RBE_TEST_REDIS_URL,
    "QUEUE_NAMES=" .. table.concat(QUEUES, ","),
    "LOG_FILE=" .. P.logs .. "/app.log",
    "CACHE_TTL_SECONDS=600",
  }
  local v1 = table.concat(lines, "\n") .. "\n"
  local v2 = v1 .. "# v2 (release 2.0.0)\nFEATURE_PHOTO_FIRST=true\n"
    .. "FEATURE_MESSAGE_ATTACHMENTS=true\nPHOTO_UPLOAD_BUCKET=drill-photos-v2\n"
  local backup = v1:gsub("^# drill%-app configuration",
    "# drill-app configuration (v1, saved before the v2 deploy)")
  fs.write(P.app .. "/.env.backup", backup, { mode = "0600" })
  fs.write(P.app .. "/.env", v2, { mode = "0600" })
end

local function pm2_home()
  local home = STATE .. "/pm2"
  -- pm2 listens on unix sockets in its home: keep the path short
  if #home + #"/rpc.sock" > 100 then
    home = fs.tmpdir("rbe-drill-pm2-")
    fs.write(home .. "/" .. D.MARKER, STATE .. "\n")
  end
  fs.mkdir(home)
  -- an existing "touch" file stops pm2's first-run banner and update check
  fs.write(home .. "/touch", tostring(NOW))
  D.append_kv(P.state, "PM2_HOME", home)
  return home
end

local function pm2_env(home)
  return { PM2_HOME = home, RBE_DRILL_OWNER = STATE, NODE_PATH = D.NODE_MODULES,
           PM2_DISABLE_VERSION_CHECK = "true" }
end

local function start_app(home, port)
  local eco = P.run .. "/ecosystem.config.js"
  local app = {
    name = APP_NAME, script = "dist/server.js", cwd = P.app, exec_mode = "fork", instances = 1,
    autorestart = true, max_restarts = 10, min_uptime = 1000, restart_delay = 200,
    kill_timeout = 3000, merge_logs = true,
    out_file = P.logs .. "/app.out.log", error_file = P.logs .. "/app.err.log",
    env = { NODE_PATH = D.NODE_MODULES, RBE_DRILL_OWNER = STATE },
  }
  fs.write(eco, "module.exports = " .. json.encode({ apps = { app } }) .. ";\n")
  proc.run({ "node", D.PM2, "start", eco }, { env = pm2_env(home), timeout = "30s" })
  local daemon = tonumber((fs.read(home .. "/pm2.pid")):match("%d+"))
  record_pid("PM2", daemon)
  local apid = tonumber(proc.output({ "node", D.PM2, "pid", APP_NAME }, { env = pm2_env(home) }))
  if apid and apid > 0 then record_pid("APP", apid) end
  local url = ("http://127.0.0.1:%d"):format(port)
  local r = proc.run({ "node", DRILL .. "/httpc.js", "--wait", "20", "--until-status", "200",
    "GET", url .. "/health" }, { check = false, timeout = "30s" })
  local ok, res = pcall(json.decode, r.stdout)
  if r.code ~= 0 or not ok or res.status ~= 200 or type(res.body) ~= "table"
      or res.body.version ~= "v2" then
    fail("the app did not come up healthy-enough at v2 (%s); its logs:\n%s\n%s",
      r.stdout ~= "" and r.stdout or r.stderr, tail(P.logs .. "/app.out.log"),
      tail(P.logs .. "/app.err.log"))
  end
  return daemon, apid, url, res.body
end

---------------------------------------------------------------------------
-- main

local function write_outputs(v)
  local order = {}
  for k in pairs(v) do order[#order + 1] = k end
  table.sort(order)
  local lines = { "# drill environment (drill/up.lua); values never contain spaces" }
  for _, k in ipairs(order) do lines[#lines + 1] = ("%s=%s"):format(k, v[k]) end
  fs.write(STATE .. "/drill.env", table.concat(lines, "\n") .. "\n", { mode = "0600" })
  fs.write(STATE .. "/drill.json", json.encode(v) .. "\n", { mode = "0600" })
end

local function up()
  local t0 = rbe.now()
  timed("prerequisites", check_prerequisites)
  timed("state dir", prepare_state_dir)

  local srv, srv_pids, sha, app_port
  rbe.all {
    function()
      srv, srv_pids = timed("postgres + redis", start_servers)
      app_port = free_port()
    end,
    function()
      local v1, v2 = timed("git repo v1/v2", create_repo)
      sha = { v1 = v1, v2 = v2 }
    end,
  }
  record_pid("PG", srv_pids.pg or "")
  record_pid("REDIS", srv_pids.redis or "")
  checkpoint("servers")

  local db, keys, vercel_pid, vercel_url, worker_pid, home
  rbe.all {
    function() db = timed("database v1 -> v2", setup_database, srv, sha) end,
    function() keys = timed("redis cache keys", seed_redis, srv) end,
    function() vercel_pid, vercel_url = timed("fake vercel", start_vercel, sha) end,
    function()
      worker_pid = timed("bullmq worker", start_node, "worker", DRILL .. "/worker.js", {
        REDIS_URL = srv.RBE_TEST_REDIS_URL, QUEUE_NAMES = table.concat(QUEUES, ","),
      })
    end,
    function() home = pm2_home() end,
  }
  checkpoint("database")

  write_app_env(db, srv, app_port)
  local pm2_pid, app_pid, app_url, health = timed("app under pm2", start_app, home, app_port)
  checkpoint("app")
  local traffic_pid = timed("traffic", start_node, "traffic", DRILL .. "/traffic.js", {
    REDIS_URL = srv.RBE_TEST_REDIS_URL, QUEUE_NAMES = table.concat(QUEUES, ","),
    APP_URL = app_url,
  })
  checkpoint("traffic")

  local v = {
    DRILL_STATE_DIR = STATE,
    DRILL_PG_URL = db.url,
    DRILL_PG_ADMIN_URL = db.admin,
    DRILL_PG_DB = "drill",
    DRILL_PG_PORT = db.port,
    DRILL_PG_BINDIR = db.bin,
    DRILL_PG_SOCKET_DIR = srv.RBE_TEST_PG_SOCKET_DIR,
    DRILL_PREDEPLOY_DUMP = db.dump,
    DRILL_BACKUP_DIR = P.backups,
    DRILL_MIGRATIONS_DIR = DRILL .. "/migrations",
    DRILL_SCHEMA_V1 = db.v1,
    DRILL_SCHEMA_V2 = db.v2,
    DRILL_REDIS_URL = srv.RBE_TEST_REDIS_URL,
    DRILL_REDIS_PORT = srv.RBE_TEST_REDIS_PORT,
    DRILL_QUEUE = QUEUES[1],
    DRILL_QUEUES = table.concat(QUEUES, ","),
    DRILL_QUEUE_PREFIX = "bull",
    DRILL_CACHE_PATTERNS = table.concat(CACHE_PATTERNS, ","),
    DRILL_CACHE_KEYS = keys,
    DRILL_APP_URL = app_url,
    DRILL_APP_PORT = app_port,
    DRILL_APP_DIR = P.app,
    DRILL_APP_NAME = APP_NAME,
    DRILL_APP_LOG = P.logs .. "/app.log",
    DRILL_APP_V1_TAG = "v1",
    DRILL_APP_V2_TAG = "v2",
    DRILL_APP_V1_SHA = sha.v1,
    DRILL_APP_V2_SHA = sha.v2,
    DRILL_ENV_FILE = P.app .. "/.env",
    DRILL_ENV_BACKUP = P.app .. "/.env.backup",
    DRILL_FEATURE_FLAG = "FEATURE_PHOTO_FIRST",
    DRILL_PM2 = D.PM2,
    DRILL_PM2_HOME = home,
    DRILL_NODE_PATH = D.NODE_MODULES,
    DRILL_LOG_DIR = P.logs,
    DRILL_VERCEL_URL = vercel_url,
    DRILL_VERCEL_TOKEN = TOKEN,
    DRILL_PROJECT = PROJECT,
    DRILL_PROJECT_ID = PROJECT_ID,
    DRILL_VERCEL_ALIAS = ALIASES[1],
    DRILL_VERCEL_V1_DEPLOYMENT = DPL.v1,
    DRILL_VERCEL_V2_DEPLOYMENT = DPL.v2,
    DRILL_PID_PG = srv_pids.pg,
    DRILL_PID_REDIS = srv_pids.redis,
    DRILL_PID_PM2 = pm2_pid,
    DRILL_PID_APP = app_pid,
    DRILL_PID_WORKER = worker_pid,
    DRILL_PID_TRAFFIC = traffic_pid,
    DRILL_PID_VERCEL = vercel_pid,
  }
  write_outputs(v)
  log("up in %.1f s: app %s at %s (%s), schema %d, %d cache keys, queues %s",
    rbe.now() - t0, health.version, app_url, health.status, db.v2, keys, v.DRILL_QUEUES)
  print(STATE .. "/drill.env")
end

local ok, err = xpcall(up, function(e)
  if type(e) == "string" and e:find("^drill: ") then return e end
  return debug.traceback(tostring(e), 2)
end)
if not ok then
  io.stderr:write(tostring(err), "\n")
  if os.getenv("DRILL_KEEP") == "1" then
    log("DRILL_KEEP=1: leaving %s as it is; run drill/down.lua on it", STATE)
  else
    log("stopping what was started")
    local dok, derr = pcall(D.down, STATE)
    if not dok then log("down failed too: %s", tostring(derr)) end
  end
  os.exit(1)
end
