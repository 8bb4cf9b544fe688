-- playbooks/phase2.lua: the "Phase 2" rollback runbook of release 2.0.0
-- (photo-first work orders, message attachments), as a playbook.
--
--   rbe plan playbooks/phase2.lua                    what it would touch
--   rbe run  playbooks/phase2.lua --reason INC-1234  roll back
--   rbe run  playbooks/phase2.lua --var app_mode=vercel --var db_mode=restore
--
-- The runbook's six phases, with its time boxes (15 minutes in all; the
-- phase boxes add up to more because the database box is sized for a
-- restore, which a down-migration does not need):
--
--   1. Notify                     1 min   tell the team, status page
--   2. Application rollback       5 min   Vercel promote | git checkout, build, pm2 restart
--   3. Database rollback         10 min   stop traffic, pg_dump, down-migrations | restore
--   4. Environment restoration    2 min   .env from .env.backup, feature flags off
--   5. Restart and smoke tests    3 min   cache, restart, queues, verify
--   6. Communication              1 min   history, tell the team, status page, stakeholders
--
-- Decisions (the runbook's "Option A / Option B"), by --var:
--   app_mode  vercel  promote the last good Vercel deployment (Option A)
--             git     check out the stable tag, build, pm2 restart (Option B)
--             both    a self-hosted API behind a Vercel front end: both at
--                     once (default; the drill has both)
--   db_mode   migrate down-migrations newest first to schema_target, in ONE
--                     transaction: the v1 tables keep every row (default)
--             restore the pre-deploy dump: exact v1 state, but rows written
--                     since the deploy are lost (the report counts them)
--             none    leave the database alone
--
-- Every endpoint is a var; each var's `env` is the drill's drill.env key,
-- so against the drill (drill/README.md):
--   set -a; . /tmp/drill/drill.env; set +a; rbe run playbooks/phase2.lua
-- In production pass --var name=value (or a --var-file of name=value
-- lines).  pg_url, pg_admin_url, vercel_token and slack_webhook are
-- secrets: masked everywhere, never journaled (resume asks the
-- environment again).
--
-- Undo: each change has one, run newest first when a later step fails, so
-- a failed rollback leaves the stack as it found it: Vercel promoted back,
-- the checkout restored AND rebuilt and the app restarted on it, queues
-- resumed, the database restored from the dump this run took before
-- touching it, .env and flags put back, flushed cache keys restored.
-- Manual steps are the runbook's human parts (status page, stakeholders):
-- `--yes` confirms them (journaled as automatic).
local pb = require "rbe.playbook"
local pg = require "rbe.pg"
local redis = require "rbe.redis"
local http = require "rbe.http"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local json = require "rbe.json"

local vercel = require "vercel"
local service = require "service"
local health = require "health"
local notify = require "notify"
local queue = require "queue"
local cache = require "cache"
local flags = require "flags"
local migrate = require "migrate"
local backup = require "backup"

local format, concat = string.format, table.concat

---------------------------------------------------------------------------
-- small helpers (no I/O at load time)

local START = "record the starting point"

local function reveal(v) return v ~= nil and rbe.reveal(v) or nil end

-- a failed check: the gate's journal line and report say why
local function fail(fmt, ...)
  error(rbe.error("verify", select("#", ...) > 0 and fmt:format(...) or fmt), 0)
end

local function list(s)
  local out = {}
  for x in tostring(s or ""):gmatch("[^,%s]+") do out[#out + 1] = x end
  return out
end

local function app_git(ctx) return ctx.vars.app_mode == "git" or ctx.vars.app_mode == "both" end
local function app_vercel(ctx)
  return ctx.vars.app_mode == "vercel" or ctx.vars.app_mode == "both"
end
local function db_migrate(ctx) return ctx.vars.db_mode == "migrate" end
local function db_restore(ctx) return ctx.vars.db_mode == "restore" end
local function db_touched(ctx) return ctx.vars.db_mode ~= "none" end
local function has_slack(ctx) return (reveal(ctx.vars.slack_webhook) or "") ~= "" end

-- a plan that says when its step will be skipped by the decision
local function decided(cond, why, plan)
  return function(ctx)
    if not cond(ctx) then return "skipped: " .. why(ctx) end
    return plan(ctx)
  end
end

-- the database: one small pool for the whole run (connections reused
-- across steps); tools (pg_dump, pg_restore) get the password through
-- PGPASSWORD, never on their command line
local pools = {}
local function db(ctx)
  local key = reveal(ctx.vars.pg_url)
  if not pools[key] then pools[key] = pg.pool(ctx.vars.pg_url, { size = 4 }) end
  return pools[key]
end


-- where a URL points, for people: host:port/db (no user, no password)
local function where_db(url)
  local s = reveal(url):gsub("^%a[%w+.-]*://", ""):gsub("^[^@/]*@", ""):gsub("%?.*$", "")
  return s
end

local function git(ctx) return service.git { dir = ctx.vars.app_dir } end

local function pm2(ctx)
  return service.pm2 { pm2 = ctx.vars.pm2, home = ctx.vars.pm2_home ~= "" and ctx.vars.pm2_home or nil }
end

local function get_json(url, timeout)
  local ok, res = rbe.try(http.get, url, { timeout = timeout or "3s", raise = false, retries = 0 })
  if not ok then return nil, tostring(res.message or res) end
  local jok, body = pcall(res.json, res)
  return res.status, jok and body or res.body
end

local function built_commit(ctx)
  local ok, text = pcall(fs.read, ctx.vars.app_dir .. "/dist/build.json")
  if not ok then return nil end
  local jok, info = pcall(json.decode, text)
  return jok and type(info) == "table" and info.commit or nil
end

local BUILD = { { "npm", "install", "--no-audit", "--no-fund" }, { "npm", "run", "build" } }

local function build(ctx, log)
  return service.build { dir = ctx.vars.app_dir, cmds = BUILD, timeout = "5m",
    log = log or (ctx.run_dir .. "/build.log") }
end

local function start_of(ctx) return ctx.results[START] or {} end

---------------------------------------------------------------------------
-- what the stack looks like (the starting point; the smoke tests compare)

local function row_counts(q, tables)
  local exists = q:query("select t, to_regclass(t) is not null as present "
    .. "from unnest(string_to_array($1, ',')) as t", concat(tables, ","))
  local sel = {}
  for _, r in ipairs(exists) do
    if r.present then sel[#sel + 1] = format("(select count(*) from %s) as %s",
      pg.quote_ident(r.t), pg.quote_ident(r.t)) end
  end
  if #sel == 0 then return {} end
  return q:query("select " .. concat(sel, ", "))[1]
end

local function schema_of(q)
  local t = q:query("select to_regclass('schema_migrations') is not null as x")[1].x
  if not t then return { version = "none" } end
  local r = q:query("select version::text as version, dirty from schema_migrations")[1]
  return r and { version = r.version, dirty = r.dirty } or { version = "none" }
end

local function queue_states(ctx)
  local out = {}
  local names = list(ctx.vars.queues)
  if #names == 0 then return out end
  local r <close> = redis.connect(ctx.vars.redis_url)
  for _, name in ipairs(names) do
    local st = queue.open(r, name, { prefix = ctx.vars.queue_prefix }):status()
    out[name] = { paused = st.paused, waiting = st.waiting, active = st.active }
  end
  return out
end

local function vercel_client(ctx)
  return vercel.client { token = ctx.vars.vercel_token, base_url = ctx.vars.vercel_url,
    timeout = "10s", wait = "2m", poll = "100ms" }
end

local function snapshot(ctx)
  local s = {}
  rbe.all {
    function()
      local status, h = get_json(ctx.vars.app_url .. "/health")
      s.app = type(h) == "table" and { status = h.status, version = h.version, commit = h.commit }
        or { status = "unreachable", error = tostring(h) }
      s.app.http = status
    end,
    function()
      db(ctx):with(function(q)
        s.schema = schema_of(q)
        s.rows = row_counts(q, list(ctx.vars.keep_tables))
      end)
    end,
    function() s.queues = queue_states(ctx) end,
    function()
      local head = git(ctx):head()
      s.git = { sha = head.sha, branch = head.branch, tag = head.tag, built = built_commit(ctx) }
    end,
    function()
      if (reveal(ctx.vars.vercel_token) or "") == "" or (ctx.vars.project or "") == "" then return end
      local c <close> = vercel_client(ctx)
      local cur = c:current(ctx.vars.project)
      s.vercel = { production = cur and cur.id, version = cur and cur.meta and cur.meta.appVersion }
    end,
  }
  return s
end

local function describe_rows(rows)
  local names = {}
  for k in pairs(rows or {}) do names[#names + 1] = k end
  table.sort(names)
  local out = {}
  for _, k in ipairs(names) do out[#out + 1] = format("%s %d", k, rows[k]) end
  return concat(out, ", ")
end

---------------------------------------------------------------------------
-- the database: backups and restores

-- pg_dump -Fc of the whole database into the backup dir (backup module:
-- the password in PGPASSWORD, the right pg_dump for the server, no half
-- file, the dump verified with pg_restore --list)
local function dump_database(ctx, name)
  local dir = ctx.vars.backup_dir ~= "" and ctx.vars.backup_dir or ctx.run_dir
  local d = backup.dump(ctx.vars.pg_url, { dir = dir, name = name, verify = true,
    bindir = ctx.vars.pg_bindir ~= "" and ctx.vars.pg_bindir or nil })
  return { path = d.path, bytes = d.bytes, tables = d.toc and d.toc.tables }
end

-- Replace the database with a dump of an older schema (backup.recreate:
-- verify, terminate the other sessions, drop, create, restore).
local function restore_database(ctx, dump)
  backup.recreate(ctx.vars.pg_admin_url, ctx.vars.pg_url, dump, { log = ctx.log,
    bindir = ctx.vars.pg_bindir ~= "" and ctx.vars.pg_bindir or nil })
end

local function backup_name(ctx) return ctx.run_id .. "-before-rollback" end

local BACKUP = "back up the database (pg_dump)"

-- undo of every database step: the dump this run took before touching it
local function undo_database(ctx)
  local b = ctx.results[BACKUP]
  if type(b) ~= "table" or not b.path then
    error(rbe.error("restore", "no dump of this run to restore (step '" .. BACKUP .. "' has no result)"), 0)
  end
  restore_database(ctx, b.path)
end

-- a restore that fails after the drop puts this run's dump back before
-- the step fails: a failed step is not undone by the runner
local function restore_or_put_back(ctx, dump)
  local ok, err = rbe.try(restore_database, ctx, dump)
  if ok then return end
  if err.dropped then
    local b = ctx.results[BACKUP]
    ctx.log("the restore failed after the drop; putting the database back from %s", b.path)
    restore_database(ctx, b.path)
    err.message = "the restore failed and the database was put back from " .. b.path .. ": "
      .. tostring(err.message)
  end
  error(err, 0)
end

---------------------------------------------------------------------------
-- smoke tests

local function expected_commit(ctx)
  if app_git(ctx) then return git(ctx):rev(ctx.vars.stable_ref) end
  return nil
end

local log_mark = {}   -- app log offset at the restart, per run

local function new_error_lines(ctx)
  local path = ctx.vars.app_log
  local st = fs.stat(path)
  if not st then return nil, "no log at " .. tostring(path) end
  local from = log_mark[ctx.run_id]
  if not from or from > st.size then
    log_mark[ctx.run_id] = st.size
    return 0
  end
  local f <close> = assert(io.open(path, "rb"))
  f:seek("set", from)
  local n = 0
  for line in f:lines() do
    if line:find(" ERROR ", 1, true) then n = n + 1 end
  end
  return n
end

---------------------------------------------------------------------------
-- the steps that wrap module steps

-- Vercel: promote the last good deployment; undo promotes back what the
-- run found in production (also after a resume that re-ran the promote)
local function vercel_promote()
  local spec = vercel.promote_step {
    token = function(ctx) return ctx.vars.vercel_token end,
    base_url = function(ctx) return ctx.vars.vercel_url end,
    project = function(ctx) return ctx.vars.project end,
    to = function(ctx, c)
      if ctx.vars.vercel_to == "last_good" then return nil end
      return c:deployment(ctx.vars.vercel_to)
    end,
    poll = "100ms", wait = "3m", timeout = "4m",
  }
  local run, undo, plan = spec.run, spec.undo, spec.plan
  spec.when = app_vercel
  spec.idempotent = true
  spec.run = function(ctx)
    local res = run(ctx)
    local was = start_of(ctx).vercel
    if not res.changed and was and was.production and was.production ~= res.to then
      res.previous, res.changed = was.production, true   -- re-run after a crash
    end
    return res
  end
  spec.undo = undo
  spec.plan = decided(app_vercel, function(ctx) return "app_mode=" .. ctx.vars.app_mode end, plan)
  return spec
end

-- the queues the run found running (so undo and resume never wake a queue
-- someone had paused on purpose)
local function running_queues(ctx)
  local st = start_of(ctx).queues
  local out = {}
  for _, name in ipairs(list(ctx.vars.queues)) do
    if not (st and st[name] and st[name].paused) then out[#out + 1] = name end
  end
  return out
end

local function set_queues(ctx, names, paused)
  if #names == 0 then return end
  local r <close> = redis.connect(ctx.vars.redis_url)
  for _, name in ipairs(names) do
    local q = queue.open(r, name, { prefix = ctx.vars.queue_prefix })
    if paused then q:pause() else q:resume() end
    ctx.log("queue %s %s", name, paused and "paused" or "resumed")
  end
end

local function pause_queues()
  local spec = queue.pause_step {
    redis = function(ctx) return ctx.vars.redis_url end,
    queues = function(ctx) return list(ctx.vars.queues) end,
    prefix = function(ctx) return ctx.vars.queue_prefix end,
    drain = "60s", timeout = "90s", idempotent = true,
  }
  spec.undo = function(ctx) set_queues(ctx, running_queues(ctx), false) end
  spec.when = db_touched
  spec.plan = decided(db_touched, function() return "db_mode=none" end, spec.plan)
  return spec
end

-- pm2 restart (service module), waiting until the app is online with a
-- new pid; `after(ctx)` runs once it is
local function pm2_restart(when, after)
  local spec = service.pm2_restart_step {
    name = function(ctx) return ctx.vars.app_name end,
    pm2 = function(ctx) return ctx.vars.pm2 end,
    home = function(ctx) return ctx.vars.pm2_home ~= "" and ctx.vars.pm2_home or nil end,
    wait = "30s", timeout = "1m",
  }
  spec.idempotent = true
  if when then
    spec.when = when
    spec.plan = decided(when, function(ctx) return "app_mode=" .. ctx.vars.app_mode end, spec.plan)
  end
  if after then
    local run = spec.run
    spec.run = function(ctx)
      local res = run(ctx)
      after(ctx)
      return res
    end
  end
  return spec
end

-- a message to the team's Slack channel (notify module), when a webhook
-- is configured
local function slack_step(o)
  local spec = notify.step { message = o.message, info = o.info, retries = 1, timeout = "20s",
    slack = function(ctx) return { webhook = ctx.vars.slack_webhook } end, when = has_slack }
  spec.plan = decided(has_slack, function() return "no slack_webhook (SLACK_WEBHOOK)" end, spec.plan)
  return spec
end


---------------------------------------------------------------------------

return pb.playbook "phase 2: roll release 2.0.0 back to 1.4.0" {
  description = "The Phase 2 rollback runbook: application, database, environment, "
    .. "restart and smoke tests, communication; within 15 minutes.",
  owner = "platform on-call",
  budget = "15m",
  vars = {
    app_mode = { default = "both", doc = "vercel | git | both" },
    db_mode = { default = "migrate", doc = "migrate | restore | none" },
    reason_text = { default = "release 2.0.0 is degraded", doc = "what the notifications say" },
    app_dir = { env = "DRILL_APP_DIR", required = true, doc = "the app's git checkout" },
    app_url = { env = "DRILL_APP_URL", required = true, doc = "the app's base URL (/health)" },
    app_name = { env = "DRILL_APP_NAME", default = "drill-app", doc = "the pm2 process" },
    app_log = { env = "DRILL_APP_LOG", default = "", doc = "the app's log (ERROR lines)" },
    stable_ref = { env = "DRILL_APP_V1_TAG", default = "v1", doc = "the last good git tag" },
    pm2 = { env = "DRILL_PM2", default = "pm2" },
    pm2_home = { env = "DRILL_PM2_HOME", default = "" },
    pg_url = { env = "DRILL_PG_URL", secret = true, required = true },
    pg_admin_url = { env = "DRILL_PG_ADMIN_URL", secret = true, default = "",
                     doc = "a superuser, for restores" },
    pg_bindir = { env = "DRILL_PG_BINDIR", default = "" },
    migrations_dir = { env = "DRILL_MIGRATIONS_DIR", required = true },
    schema_target = { env = "DRILL_SCHEMA_V1", required = true, doc = "the version to go down to" },
    predeploy_dump = { env = "DRILL_PREDEPLOY_DUMP", default = "", doc = "for db_mode=restore" },
    backup_dir = { env = "DRILL_BACKUP_DIR", default = "", doc = "default: the run directory" },
    keep_tables = { default = "organizations,users,work_orders,messages",
                    doc = "tables whose rows the rollback must keep" },
    redis_url = { env = "DRILL_REDIS_URL", required = true },
    queues = { env = "DRILL_QUEUES", default = "" },
    queue_prefix = { env = "DRILL_QUEUE_PREFIX", default = "bull" },
    cache_patterns = { default = "cache:work_order:*,cache:flags,gemini:caption:*",
                       doc = "what v2 cached (sessions stay)" },
    env_file = { env = "DRILL_ENV_FILE", required = true },
    env_backup = { env = "DRILL_ENV_BACKUP", required = true },
    db_flags = { default = "photo_first,message_attachments", doc = "feature_flags rows to turn off" },
    vercel_url = { env = "DRILL_VERCEL_URL", default = "https://api.vercel.com" },
    vercel_token = { env = "DRILL_VERCEL_TOKEN", secret = true, default = "" },
    project = { env = "DRILL_PROJECT", default = "" },
    vercel_to = { default = "last_good", doc = "a deployment id, or last_good" },
    slack_webhook = { env = "SLACK_WEBHOOK", secret = true, default = "" },
  },

  -------------------------------------------------------------------------
  pb.phase "1. notify" { budget = "1m",
    pb.parallel {
      -- what the stack looks like now: the smoke tests compare with it and
      -- the undo goes back to it
      pb.step(START) {
        idempotent = true, timeout = "30s",
        run = function(ctx)
          local s = snapshot(ctx)
          ctx.log("app %s (%s), schema %s, rows: %s", tostring(s.app.version), s.app.status,
            s.schema.version, describe_rows(s.rows))
          return s
        end,
        plan = function(ctx)
          return format("would read the app's /health, git HEAD, Vercel production, schema "
            .. "version, row counts of %s (postgres at %s), queue states", ctx.vars.keep_tables,
            where_db(ctx.vars.pg_url))
        end,
      },
      pb.step "tell the team: rollback started" (slack_step {
        message = "started",
        info = function(ctx) return { reason = ctx.reason or ctx.vars.reason_text } end,
      }),
    },
    pb.manual "status page: post 'Investigating: rolling back release 2.0.0'",
  },

  -------------------------------------------------------------------------
  -- Option A (Vercel) and Option B (git) touch different systems: when
  -- app_mode=both they run side by side, B as its own sequence
  pb.phase "2. application rollback" { budget = "5m",
    pb.parallel {
      pb.step "vercel: promote the last good deployment" (vercel_promote()),

      pb.phase "option B: git checkout, build, pm2 restart" {
        pb.step "git: check out the stable release and build" {
          when = app_git, timeout = "4m",
          check = function(ctx)
            local want = git(ctx):rev(ctx.vars.stable_ref)
            return git(ctx):head().sha == want and built_commit(ctx) == want
          end,
          run = function(ctx)
            local rec = git(ctx):checkout(ctx.vars.stable_ref,
              { message = "rbe run " .. ctx.run_id .. ": before checkout of " .. ctx.vars.stable_ref })
            ctx.log("checked out %s (%s), was %s", ctx.vars.stable_ref, rec.sha:sub(1, 12),
              rec.previous_branch or rec.previous:sub(1, 12))
            local b = build(ctx)
            ctx.log("built in %.1fs (log %s)", b.elapsed, b.log)
            return rec
          end,
          -- back on the release the run found, rebuilt, and running it
          undo = function(ctx)
            local g = git(ctx)
            local rec = ctx.results[ctx.step]
            if type(rec) == "table" and rec.previous then
              g:restore(rec)
            else
              local was = start_of(ctx).git or {}
              proc.run({ "git", "checkout", "--quiet", was.branch or was.sha },
                { cwd = ctx.vars.app_dir, timeout = "1m" })
            end
            build(ctx, ctx.run_dir .. "/build-undo.log")
            local st = pm2(ctx):status(ctx.vars.app_name)
            if st and st.status == "online" then pm2(ctx):restart(ctx.vars.app_name, { wait = "30s" }) end
            ctx.log("back at %s, rebuilt and restarted", g:head().branch or g:head().sha:sub(1, 12))
          end,
          plan = decided(app_git, function(ctx) return "app_mode=" .. ctx.vars.app_mode end,
            function(ctx)
              local g = git(ctx)
              local head = g:head()
              return {
                format("would check out %s (%s) in %s, now at %s (%s); %d local change(s) stashed",
                  ctx.vars.stable_ref, g:rev(ctx.vars.stable_ref):sub(1, 12), ctx.vars.app_dir,
                  head.branch or head.tag or "detached", head.sha:sub(1, 12), #g:changes()),
                "would run `npm install` and `npm run build` (dist/ is what pm2 runs)",
                "undo: back to " .. (head.branch or head.sha:sub(1, 12)) .. ", rebuilt, restarted",
              }
            end),
        },
        pb.step "pm2: restart the app on the stable build" (pm2_restart(app_git)),
        pb.gate "verify: the stable release answers" {
          when = app_git, every = "100ms", pass = 2, within = "1m",
          check = function(ctx)
            local want = expected_commit(ctx)
            local status, v = get_json(ctx.vars.app_url .. "/api/version")
            if status ~= 200 or type(v) ~= "table" then
              fail("GET /api/version -> %s", tostring(status or v))
            end
            if v.commit ~= want then
              fail("the app runs %s, not %s", tostring(v.commit):sub(1, 12), want:sub(1, 12))
            end
            return true
          end,
        },
      },
    },
  },

  -------------------------------------------------------------------------
  pb.phase "3. database rollback" { budget = "10m",
    pb.step "stop traffic: pause the queues" (pause_queues()),

    pb.step(BACKUP) {
      when = db_touched, idempotent = true, timeout = "10m",
      run = function(ctx)
        local b = dump_database(ctx, backup_name(ctx))
        ctx.log("pg_dump: %d tables, %d KiB in %s", b.tables or 0, b.bytes // 1024,
          b.path:match("[^/]*$"))
        return b
      end,
      plan = decided(db_touched, function() return "db_mode=none" end, function(ctx)
        return format("would pg_dump %s into %s/<run id>-before-rollback-<time>.dump (the undo "
          .. "of every database step restores it)", where_db(ctx.vars.pg_url),
          ctx.vars.backup_dir ~= "" and ctx.vars.backup_dir or "<run dir>")
      end),
    },

    -- Option A.  golang-migrate runs each file in its own transaction; a
    -- rollback wants all or nothing, so the down files run in ONE
    -- transaction (PostgreSQL's DDL is transactional) under golang-migrate's
    -- advisory lock, together with the tracking row and rbe's step marker:
    -- a failure or a crash leaves the schema exactly at v2.
    pb.step "down-migrations to the stable schema" {
      when = db_migrate, timeout = "9m",
      confirm = "The down-migrations drop v2's columns, table, indexes and trigger "
        .. "(a dump of the database was just taken).",
      pg_tx = db,
      run = function(ctx, tx)
        local dir, target = ctx.vars.migrations_dir, math.tointeger(tonumber(ctx.vars.schema_target))
        local name = tx:query("select current_database() as d")[1].d
        tx:query("select pg_advisory_xact_lock($1)", migrate.lock_id(name))
        local p = migrate.plan(tx, dir, { direction = "down", to = target })
        if p.dirty then
          error(rbe.error("migrate", "schema_migrations is dirty at " .. tostring(p.from)
            .. ": a migration failed half-way; fix it by hand first"), 0)
        end
        for _, file in ipairs(p.files) do
          local t0 = rbe.now()
          tx:exec(fs.read(file))
          ctx.log("down %s (%.0f ms)", file:match("[^/]*$"), (rbe.now() - t0) * 1000)
        end
        tx:query("delete from schema_migrations")
        tx:query("insert into schema_migrations (version, dirty) values ($1, false)", target)
        return { from = tostring(p.from), to = tostring(target), files = #p.files }
      end,
      undo = undo_database,
      plan = decided(db_migrate, function(ctx) return "db_mode=" .. ctx.vars.db_mode end,
        function(ctx)
          return db(ctx):with(function(q)
            local p = migrate.plan(q, ctx.vars.migrations_dir,
              { direction = "down", to = math.tointeger(tonumber(ctx.vars.schema_target)) })
            if #p.files == 0 then return "nothing: the schema is at " .. tostring(p.from) end
            local out = { format("would run %d down file(s) newest first, in one transaction, "
              .. "on %s:", #p.files, where_db(ctx.vars.pg_url)) }
            for _, f in ipairs(p.files) do out[#out + 1] = "  " .. f:match("[^/]*$") end
            out[#out + 1] = format("schema_migrations %s -> %s; undo restores the dump",
              tostring(p.from), tostring(p.to))
            return out
          end)
        end),
    },

    -- Option B: the dump taken before the v2 migrations
    pb.step "restore the pre-deploy dump" {
      when = db_restore, idempotent = true, timeout = "9m",
      confirm = "Restoring the pre-deploy dump DROPS the database: rows written since "
        .. "the deploy are lost (a dump of them was just taken).",
      run = function(ctx)
        local before = start_of(ctx).rows or {}
        restore_or_put_back(ctx, ctx.vars.predeploy_dump)
        local after = db(ctx):with(function(q) return row_counts(q, list(ctx.vars.keep_tables)) end)
        local lost = {}
        for t, n in pairs(before) do
          if (after[t] or 0) < n then lost[t] = n - (after[t] or 0) end
        end
        if next(lost) then ctx.log("rows written since the deploy, now only in the backup: %s",
          describe_rows(lost)) end
        return { dump = ctx.vars.predeploy_dump, lost = lost }
      end,
      undo = undo_database,
      plan = decided(db_restore, function(ctx) return "db_mode=" .. ctx.vars.db_mode end,
        function(ctx)
          local d = ctx.vars.predeploy_dump
          return {
            format("would terminate the sessions on %s, drop and recreate it, and pg_restore %s%s",
              where_db(ctx.vars.pg_url), d, fs.exists(d) and "" or " (MISSING: the step will fail)"),
            "rows written since the deploy are lost (counted in the report); undo restores "
              .. "the dump this run takes first",
          }
        end),
    },

    pb.gate "verify: the schema is at the stable version" {
      when = db_touched, every = "250ms", pass = 1, within = "30s",
      check = function(ctx)
        local s = db(ctx):with(schema_of)
        if s.version ~= ctx.vars.schema_target or s.dirty then
          fail("schema_migrations is %s%s, want %s", s.version,
            s.dirty and " (dirty)" or "", ctx.vars.schema_target)
        end
        return true
      end,
    },
  },

  -------------------------------------------------------------------------
  pb.phase "4. environment restoration" { budget = "2m",
    pb.parallel {
      pb.step ".env from .env.backup" {
        idempotent = true,
        check = function(ctx)
          return fs.read(ctx.vars.env_file) == fs.read(ctx.vars.env_backup)
        end,
        run = function(ctx)
          local keep = ctx.run_dir .. "/env-before-rollback"
          if not fs.exists(keep) then
            fs.write(keep, fs.read(ctx.vars.env_file), { mode = "0600" })
          end
          fs.write(ctx.vars.env_file, fs.read(ctx.vars.env_backup), { mode = "0600" })
          ctx.log(".env replaced by .env.backup (the v2 .env kept in the run directory)")
          return { kept = keep }
        end,
        undo = function(ctx)
          local keep = ctx.run_dir .. "/env-before-rollback"
          if fs.exists(keep) then
            fs.write(ctx.vars.env_file, fs.read(keep), { mode = "0600" })
            ctx.log("%s put back", ctx.vars.env_file)
          end
        end,
        plan = function(ctx)
          local now, old = fs.read(ctx.vars.env_file), fs.read(ctx.vars.env_backup)
          if now == old then return "nothing: " .. ctx.vars.env_file .. " is .env.backup already" end
          local gone = {}
          for line in now:gmatch("[^\n]+") do
            local k = line:match("^%s*([%w_]+)%s*=")
            if k and not old:find("\n%s*" .. k .. "%s*=") and not old:find("^%s*" .. k .. "%s*=") then
              gone[#gone + 1] = k
            end
          end
          return format("would replace %s with %s (drops %s); undo puts it back",
            ctx.vars.env_file, ctx.vars.env_backup, #gone > 0 and concat(gone, ", ") or "nothing")
        end,
      },
      pb.step "feature flags off in the database" {
        idempotent = true,
        run = function(ctx)
          local store = flags.pg(db(ctx), { by = ctx.user })
          local out = {}
          for _, name in ipairs(list(ctx.vars.db_flags)) do
            local r = store:set(name, false)
            out[#out + 1] = { name = name, previous = r.previous, existed = r.existed }
            ctx.log("feature_flags.%s: %s -> false", name, tostring(r.previous))
          end
          return out
        end,
        undo = function(ctx)
          local store = flags.pg(db(ctx), { by = ctx.user })
          for _, f in ipairs(ctx.results[ctx.step] or {}) do
            if f.existed and f.previous ~= nil then store:set(f.name, f.previous)
            elseif not f.existed then store:delete(f.name) end
          end
        end,
        plan = function(ctx)
          local store = flags.pg(db(ctx))
          local out = {}
          for _, name in ipairs(list(ctx.vars.db_flags)) do
            local ok, v, found = pcall(store.get, store, name)
            out[#out + 1] = format("would set feature_flags.%s: %s -> false", name,
              ok and (found and tostring(v) or "no row") or "?")
          end
          return out
        end,
      },
    },
  },

  -------------------------------------------------------------------------
  pb.phase "5. restart and smoke tests" { budget = "3m",
    pb.parallel {
      pb.step "flush the v2 caches" (cache.flush_step {
        redis = function(ctx) return ctx.vars.redis_url end,
        patterns = function(ctx) return list(ctx.vars.cache_patterns) end,
        backup = true, idempotent = true, timeout = "1m",
      }),
      pb.step "pm2: restart with the restored .env" (pm2_restart(nil, function(ctx)
        -- the smoke test counts ERROR lines written after this point
        log_mark[ctx.run_id] = nil
        if ctx.vars.app_log ~= "" then new_error_lines(ctx) end
      end)),
    },
    pb.step "resume the queues" {
      idempotent = true,
      run = function(ctx)
        local names = running_queues(ctx)
        set_queues(ctx, names, false)
        return { resumed = names }
      end,
      undo = function(ctx)
        local r = ctx.results[ctx.step]
        set_queues(ctx, type(r) == "table" and r.resumed or running_queues(ctx), true)
      end,
      plan = function(ctx)
        local names = running_queues(ctx)
        return #names > 0 and ("would resume " .. concat(names, ", ") .. " (the queues running "
          .. "at the start; one paused before the run stays paused)") or "no queues"
      end,
    },
    pb.parallel {
      pb.gate "verify: health is ok" {
        every = "500ms", pass = 3, within = "2m",
        check = function(ctx)
          return health.assert(health.http(ctx.vars.app_url .. "/health", { status = 200,
            json = { status = "ok", api = "ok", database = "ok", redis = "ok" }, timeout = "2s" }))
        end,
      },
      pb.gate "verify: API smoke tests" {
        every = "500ms", pass = 2, within = "2m",
        check = function(ctx)
          local status, v = get_json(ctx.vars.app_url .. "/api/version")
          if status ~= 200 then fail("GET /api/version -> " .. tostring(status or v)) end
          local want = expected_commit(ctx)
          if want and v.commit ~= want then
            fail("the app runs " .. tostring(v.commit):sub(1, 12) .. ", want " .. want:sub(1, 12))
          end
          local id = db(ctx):query("select id from messages where media_url is not null "
            .. "order by id desc limit 1")[1]
          if id then
            local s2, m = get_json(ctx.vars.app_url .. "/api/messages/" .. id.id)
            if s2 ~= 200 or type(m) ~= "table" or m.mediaUrl == nil or m.mediaUrl == json.null then
              fail("GET /api/messages/%d -> %s without mediaUrl", id.id, tostring(s2))
            end
          end
          for _, wo in ipairs { 1, 2, 3, 4 } do
            local s3 = get_json(ctx.vars.app_url .. "/api/work-orders/" .. wo)
            if s3 ~= 200 then fail("GET /api/work-orders/%d -> %s", wo, tostring(s3)) end
          end
          return true
        end,
      },
      pb.gate "verify: queues are processing" {
        every = "500ms", pass = 2, within = "2m",
        check = function(ctx)
          local st = queue_states(ctx)
          for _, name in ipairs(running_queues(ctx)) do
            local q = st[name]
            if not q or q.paused then fail("queue " .. name .. " is paused") end
            if q.waiting > 50 then fail("queue %s: %d jobs waiting", name, q.waiting) end
          end
          return true
        end,
      },
      pb.gate "verify: no new errors in the log" {
        when = function(ctx) return ctx.vars.app_log ~= "" end,
        every = "1s", pass = 3, within = "2m",
        check = function(ctx)
          local n, why = new_error_lines(ctx)
          if not n then error(why, 0) end
          if n > 0 then
            log_mark[ctx.run_id] = nil   -- start counting again
            fail("%d new ERROR line(s) in %s", n, ctx.vars.app_log)
          end
          return true
        end,
      },
      pb.gate "verify: the data rows are kept" {
        when = function(ctx) return not db_restore(ctx) end,
        every = "500ms", pass = 1, within = "1m",
        check = function(ctx)
          local before = start_of(ctx).rows or {}
          local now = db(ctx):with(function(q) return row_counts(q, list(ctx.vars.keep_tables)) end)
          for t, n in pairs(before) do
            if (now[t] or 0) < n then
              fail("%s has %d rows, %d at the start", t, now[t] or 0, n)
            end
          end
          ctx.log("rows: %s", describe_rows(now))
          return true
        end,
      },
    },
  },

  -------------------------------------------------------------------------
  pb.phase "6. communication" { budget = "1m",
    pb.step "record the rollback in deployment_history" {
      pg_tx = db,
      run = function(ctx, tx)
        local stable = tx:query("select version, git_sha, vercel_deployment_id from "
          .. "deployment_history where status = 'stable' order by deployed_at desc limit 1")[1]
        local bad = tx:query("update deployment_history set status = 'rolled_back' "
          .. "where status = 'active' returning id, version")
        local row = tx:query("insert into deployment_history (version, git_sha, "
          .. "vercel_deployment_id, status, deployed_by, notes) values ($1, $2, $3, 'rollback', "
          .. "$4, $5) returning id", stable and stable.version or ctx.vars.stable_ref,
          stable and stable.git_sha or git(ctx):rev(ctx.vars.stable_ref),
          stable and stable.vercel_deployment_id or rbe.null, ctx.user or "rbe",
          format("rbe run %s: %s", ctx.run_id, ctx.reason or ctx.vars.reason_text))[1]
        local ids = {}
        for _, b in ipairs(bad) do ids[#ids + 1] = b.id end
        return { id = row.id, rolled_back = ids }
      end,
      undo = function(ctx)
        local r = ctx.results[ctx.step]
        if type(r) ~= "table" then return end
        db(ctx):tx(function(tx)
          tx:query("delete from deployment_history where id = $1", r.id)
          for _, id in ipairs(r.rolled_back or {}) do
            tx:query("update deployment_history set status = 'active' where id = $1", id)
          end
        end)
      end,
      plan = function(ctx)
        return "would insert a 'rollback' row (by the operator) into deployment_history and "
          .. "mark the active release 'rolled_back'"
      end,
    },
    pb.step "tell the team: rollback done" (slack_step {
      message = "done",
      info = function(ctx) return { result = "rolled back to " .. ctx.vars.stable_ref } end,
    }),
    pb.manual "status page: 'Resolved: release 2.0.0 rolled back to 1.4.0'",
    pb.manual "stakeholders: send the summary (the run's report.md)",
  },
}
