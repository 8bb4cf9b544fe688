-- playbooks/emergency.lua: the generic emergency rollback runbook, as a
-- playbook.  For when something is on fire and the release must go back
-- to the last stable commit NOW:
--
--   1. gather information   git revision, ERROR lines in the log, queue
--                           stats, row counts, free disk, app health: all
--                           at once, journaled (the post-mortem starts here)
--   2. stop the bleeding    pause the job queues (undo: resume them)
--   3. roll back the code   checkout of the stable commit, npm install,
--                           npm run build, pm2 restart
--   4. verify               health ok on the stable commit, no new ERROR lines
--   5. recover              resume the queues one at a time, checking health
--                           in between; flush the cache patterns (the keys
--                           are saved first; max_cache_keys guards against a
--                           pattern that matches far more than expected)
--
--   rbe plan playbooks/emergency.lua
--   rbe run  playbooks/emergency.lua --reason "INC-1234: 500s on checkout"
--
-- Failure policy.  Until the stable commit is verified healthy (phases
-- 1-4), a failure undoes everything: the checkout goes back, is rebuilt
-- and restarted, and the queues are resumed, so the stack is as it was
-- and a person escalates.  In phase 5 the stable commit is already
-- serving: a failure there stops the run without undoing the rollback.
--
-- The stable commit is --var stable_ref (a tag, branch or sha), or by
-- default the newest 'stable' release in deployment_history.
--
-- Vars default to the drill's drill.env keys (drill/README.md):
--   set -a; . /tmp/drill/drill.env; set +a; rbe run playbooks/emergency.lua
local pb = require "rbe.playbook"
local pg = require "rbe.pg"
local redis = require "rbe.redis"
local http = require "rbe.http"
local proc = require "rbe.proc"
local fs = require "rbe.fs"

local service = require "service"
local health = require "health"
local queue = require "queue"
local cache = require "cache"

local format, concat = string.format, table.concat

---------------------------------------------------------------------------
-- helpers

local STABLE = "find the stable commit"
local QUEUES = "queues: job counts"

local function reveal(v) return v ~= nil and rbe.reveal(v) or nil end

local function fail(fmt, ...)
  error(rbe.error("verify", select("#", ...) > 0 and fmt:format(...) or fmt), 0)
end

local function list(s)
  local out = {}
  for x in tostring(s or ""):gmatch("[^,%s]+") do out[#out + 1] = x end
  return out
end

local pools = {}
local function db(ctx)
  local key = reveal(ctx.vars.pg_url)
  if not pools[key] then pools[key] = pg.pool(ctx.vars.pg_url, { size = 2 }) end
  return pools[key]
end

local function git(ctx) return service.git { dir = ctx.vars.app_dir } end

local function pm2(ctx)
  return service.pm2 { pm2 = ctx.vars.pm2, home = ctx.vars.pm2_home ~= "" and ctx.vars.pm2_home or nil }
end

local function get_json(url)
  local ok, res = rbe.try(http.get, url, { timeout = "3s", raise = false, retries = 0 })
  if not ok then return nil, tostring(res.message or res) end
  local jok, body = pcall(res.json, res)
  return res.status, jok and body or res.body
end

-- the stable commit: the var, or the newest 'stable' release
local function find_stable(ctx)
  local ref, version = ctx.vars.stable_ref, nil
  if ref == "" then
    local row = db(ctx):query("select version, git_sha from deployment_history "
      .. "where status = 'stable' order by deployed_at desc limit 1")[1]
    if not row then
      error(rbe.error("rollback", "no --var stable_ref and no 'stable' release in "
        .. "deployment_history"), 0)
    end
    ref, version = row.git_sha, row.version
  end
  return { ref = ref, sha = git(ctx):rev(ref), version = version }
end

local function stable_of(ctx)
  local r = ctx.results[STABLE]
  if type(r) == "table" then return r end
  return find_stable(ctx)
end

-- the queues that were running when the run started
local function running_queues(ctx)
  local st = ctx.results[QUEUES]
  local out = {}
  for _, name in ipairs(list(ctx.vars.queues)) do
    local q = type(st) == "table" and st[name]
    if not (q and q.paused) then out[#out + 1] = name end
  end
  return out
end

local function with_redis(ctx, fn)
  local r <close> = redis.connect(ctx.vars.redis_url)
  return fn(r)
end

local function open_queue(ctx, r, name)
  return queue.open(r, name, { prefix = ctx.vars.queue_prefix })
end

local function restart_if_online(ctx)
  local st = pm2(ctx):status(ctx.vars.app_name)
  if st and st.status == "online" then pm2(ctx):restart(ctx.vars.app_name, { wait = "30s" }) end
end

local function build_cmds() return { { "npm", "install", "--no-audit", "--no-fund" }, { "npm", "run", "build" } } end

local function with_idempotent(spec)
  spec.idempotent = true
  return spec
end

local log_mark = {}
local function new_error_lines(ctx)
  local st = fs.stat(ctx.vars.app_log)
  if not st then return nil end
  local from = log_mark[ctx.run_id]
  if not from or from > st.size then
    log_mark[ctx.run_id] = st.size
    return 0
  end
  local f <close> = assert(io.open(ctx.vars.app_log, "rb"))
  f:seek("set", from)
  local n = 0
  for line in f:lines() do
    if line:find(" ERROR ", 1, true) then n = n + 1 end
  end
  return n
end

---------------------------------------------------------------------------
-- phase 1: read-only information steps

local function info(name, plan, run)
  return pb.step(name) { idempotent = true, timeout = "30s", run = run,
    plan = type(plan) == "function" and plan or function() return "would read " .. plan end }
end


---------------------------------------------------------------------------

return pb.playbook "emergency: back to the last stable commit" {
  description = "The generic emergency rollback runbook: information, pause queues, "
    .. "checkout, install, build, restart, health, resume queues gradually, flush caches.",
  owner = "whoever is on call",
  budget = "15m",
  vars = {
    stable_ref = { default = "", doc = "default: the newest 'stable' row of deployment_history" },
    app_dir = { env = "DRILL_APP_DIR", required = true },
    app_url = { env = "DRILL_APP_URL", required = true },
    app_name = { env = "DRILL_APP_NAME", default = "drill-app" },
    app_log = { env = "DRILL_APP_LOG", default = "" },
    pm2 = { env = "DRILL_PM2", default = "pm2" },
    pm2_home = { env = "DRILL_PM2_HOME", default = "" },
    pg_url = { env = "DRILL_PG_URL", secret = true, required = true },
    keep_tables = { default = "organizations,users,work_orders,messages" },
    redis_url = { env = "DRILL_REDIS_URL", required = true },
    queues = { env = "DRILL_QUEUES", default = "" },
    queue_prefix = { env = "DRILL_QUEUE_PREFIX", default = "bull" },
    cache_patterns = { env = "DRILL_CACHE_PATTERNS", default = "" },
    max_cache_keys = { default = "100000", doc = "refuse to flush more keys than this" },
    resume_every = { default = "2s", doc = "pause between two queues when resuming" },
  },

  -------------------------------------------------------------------------
  pb.phase "1. gather information" { budget = "1m",
    pb.parallel {
      info(STABLE, function(ctx)
        local s = find_stable(ctx)
        return format("the stable commit: %s = %s%s (%s)", s.ref, s.sha:sub(1, 12),
          s.version and (", release " .. s.version) or "",
          ctx.vars.stable_ref ~= "" and "--var stable_ref" or "the newest 'stable' row of deployment_history")
      end, function(ctx)
        local s = find_stable(ctx)
        ctx.log("stable: %s = %s%s", s.ref, s.sha:sub(1, 12), s.version and (" (" .. s.version .. ")") or "")
        return s
      end),
      info("git: revision and recent commits", "git HEAD and the last 5 commits", function(ctx)
        local head = git(ctx):head()
        local log = proc.output({ "git", "log", "--oneline", "-5" }, { cwd = ctx.vars.app_dir })
        ctx.log("HEAD %s (%s)", head.sha:sub(1, 12), head.branch or head.tag or "detached")
        local lines = {}
        for l in log:gmatch("[^\n]+") do lines[#lines + 1] = l end
        return { sha = head.sha, branch = head.branch, tag = head.tag, log = lines }
      end),
      info("log: error counts", "the app log's ERROR lines of the last 5 minutes", function(ctx)
        if ctx.vars.app_log == "" then return { skipped = "no app_log" } end
        local _, ev = health.error_rate { log = ctx.vars.app_log, window = "5m", max = 1 }
        ctx.log("%s", ev.reason)
        return { errors = ev.errors, lines = ev.total, per_minute = ev.per_minute, reason = ev.reason }
      end),
      info(QUEUES, "each queue's job counts", function(ctx)
        local out = {}
        with_redis(ctx, function(r)
          for _, name in ipairs(list(ctx.vars.queues)) do
            local st = open_queue(ctx, r, name):status()
            out[name] = { paused = st.paused, waiting = st.waiting, active = st.active,
              delayed = st.delayed, failed = st.failed, completed = st.completed }
            ctx.log("queue %s: %s, %d waiting, %d active, %d failed", name,
              st.paused and "paused" or "running", st.waiting, st.active, st.failed)
          end
        end)
        return out
      end),
      info("database: row counts", "the row counts of keep_tables and the schema version", function(ctx)
        local sel = {}
        for _, t in ipairs(list(ctx.vars.keep_tables)) do
          sel[#sel + 1] = format("(select count(*) from %s) as %s", pg.quote_ident(t), pg.quote_ident(t))
        end
        local rows = db(ctx):query("select " .. concat(sel, ", "))[1]
        local v = db(ctx):query("select version::text as v, dirty from schema_migrations")[1]
        local bits = {}
        for _, t in ipairs(list(ctx.vars.keep_tables)) do bits[#bits + 1] = t .. " " .. rows[t] end
        ctx.log("schema %s; %s", v and v.v or "?", concat(bits, ", "))
        return { rows = rows, schema = v and v.v }
      end),
      info("disk: free space", "df of the app's filesystem", function(ctx)
        local out = proc.output { "df", "-Pk", ctx.vars.app_dir }
        local size, used, avail, pct, mount = out:match("\n%S+%s+(%d+)%s+(%d+)%s+(%d+)%s+(%d+)%%%s+(%S+)")
        ctx.log("%s: %d MiB free (%s%% used)", tostring(mount), math.floor((tonumber(avail) or 0) / 1024),
          tostring(pct))
        return { mount = mount, size_kb = tonumber(size), avail_kb = tonumber(avail),
                 used_pct = tonumber(pct) }
      end),
      info("app: health and error rate", "the app's /health and /api/metrics", function(ctx)
        local _, h = get_json(ctx.vars.app_url .. "/health")
        local _, m = get_json(ctx.vars.app_url .. "/api/metrics")
        local out = { health = type(h) == "table" and h.status or tostring(h),
          version = type(h) == "table" and h.version or nil,
          error_rate = type(m) == "table" and m.error_rate or nil,
          requests = type(m) == "table" and m.requests or nil }
        ctx.log("app %s at %s; error rate %s", tostring(out.health), tostring(out.version),
          out.error_rate and format("%.1f%% of %d requests", out.error_rate * 100, out.requests) or "?")
        return out
      end),
    },
  },

  -------------------------------------------------------------------------
  pb.phase "2. stop the bleeding" { budget = "2m",
    pb.step "pause the queues" ((function()
      local spec = queue.pause_step {
        redis = function(ctx) return ctx.vars.redis_url end,
        queues = function(ctx) return list(ctx.vars.queues) end,
        prefix = function(ctx) return ctx.vars.queue_prefix end,
        drain = "60s", timeout = "90s", idempotent = true,
      }
      -- undo resumes what was running at the start (also after a resume
      -- of this run re-ran the pause)
      spec.undo = function(ctx)
        with_redis(ctx, function(r)
          for _, name in ipairs(running_queues(ctx)) do
            open_queue(ctx, r, name):resume()
            ctx.log("queue %s resumed", name)
          end
        end)
      end
      return spec
    end)()),
  },

  -------------------------------------------------------------------------
  pb.phase "3. roll back the code" { budget = "5m",
    pb.step "git: check out the stable commit" ((function()
      local spec = service.git_checkout_step {
        dir = function(ctx) return ctx.vars.app_dir end,
        ref = function(ctx) return stable_of(ctx).sha end,
        timeout = "1m",
      }
      -- back where it was, rebuilt, and the app restarted on it: the undo
      -- of the install, build and restart steps that follow
      local undo = spec.undo
      spec.undo = function(ctx)
        if type(ctx.results[ctx.step]) == "table" then
          undo(ctx)
        else  -- checked out before a crash, no record: back to what phase 1 saw
          local was = ctx.results["git: revision and recent commits"] or {}
          proc.run({ "git", "checkout", "--quiet", was.branch or was.sha },
            { cwd = ctx.vars.app_dir, timeout = "1m" })
        end
        service.build { dir = ctx.vars.app_dir, cmds = build_cmds(), timeout = "5m",
          log = ctx.run_dir .. "/build-undo.log" }
        restart_if_online(ctx)
        ctx.log("rebuilt and restarted on %s", git(ctx):head().branch or git(ctx):head().sha:sub(1, 12))
      end
      spec.check = function(ctx) return git(ctx):head().sha == stable_of(ctx).sha end
      return spec
    end)()),
    pb.step "npm install" (with_idempotent(service.build_step {
      dir = function(ctx) return ctx.vars.app_dir end,
      cmd = { "npm", "install", "--no-audit", "--no-fund" }, build_timeout = "5m",
    })),
    pb.step "npm run build" (with_idempotent(service.build_step {
      dir = function(ctx) return ctx.vars.app_dir end,
      cmd = { "npm", "run", "build" }, build_timeout = "5m",
    })),
    pb.step "pm2: restart" (with_idempotent(service.pm2_restart_step {
      name = function(ctx) return ctx.vars.app_name end,
      pm2 = function(ctx) return ctx.vars.pm2 end,
      home = function(ctx) return ctx.vars.pm2_home ~= "" and ctx.vars.pm2_home or nil end,
      wait = "30s", timeout = "1m",
    })),
  },

  -------------------------------------------------------------------------
  pb.phase "4. verify" { budget = "2m",
    pb.parallel {
      pb.gate "verify: healthy on the stable commit" {
        every = "500ms", pass = 3, within = "1m",
        check = function(ctx)
          health.assert(health.http(ctx.vars.app_url .. "/health", { status = 200,
            json = { status = "ok", database = "ok", redis = "ok" }, timeout = "2s" }))
          local want = stable_of(ctx).sha
          local _, h = get_json(ctx.vars.app_url .. "/health")
          if type(h) ~= "table" or h.commit ~= want then
            fail("the app runs %s, want %s", type(h) == "table" and tostring(h.commit):sub(1, 12)
              or "?", want:sub(1, 12))
          end
          return true
        end,
      },
      pb.gate "verify: no new errors in the log" {
        when = function(ctx) return ctx.vars.app_log ~= "" end,
        every = "1s", pass = 3, within = "1m",
        check = function(ctx)
          local n = new_error_lines(ctx)
          if not n then fail("no log at %s", ctx.vars.app_log) end
          if n > 0 then
            log_mark[ctx.run_id] = nil
            fail("%d new ERROR line(s) in %s", n, ctx.vars.app_log)
          end
          return true
        end,
      },
    },
  },

  -------------------------------------------------------------------------
  -- the stable commit serves: a failure from here on stops, no undo
  pb.phase "5. recover" { budget = "5m",
    pb.step "resume the queues gradually" {
      on_failure = "stop", idempotent = true, timeout = "4m",
      run = function(ctx)
        local names, every = running_queues(ctx), rbe.duration(ctx.vars.resume_every)
        local done = {}
        with_redis(ctx, function(r)
          for i, name in ipairs(names) do
            local q = open_queue(ctx, r, name)
            local before = q:status()
            q:resume()
            done[#done + 1] = name
            rbe.sleep(every)
            local after = q:status()
            health.assert(health.http(ctx.vars.app_url .. "/health", { status = 200,
              json = { status = "ok" }, timeout = "2s" }))
            ctx.log("queue %s resumed (%d/%d): %d waiting -> %d, %d completed since", name, i,
              #names, before.waiting, after.waiting, after.completed - before.completed)
          end
        end)
        return { resumed = done }
      end,
      plan = function(ctx)
        local names = running_queues(ctx)
        return format("would resume %s one at a time, %s apart, checking health after each",
          #names > 0 and concat(names, ", ") or "no queue", ctx.vars.resume_every)
      end,
    },
    pb.step "flush the cache patterns" ((function()
      local spec = cache.flush_step {
        redis = function(ctx) return ctx.vars.redis_url end,
        patterns = function(ctx) return list(ctx.vars.cache_patterns) end,
        max_keys = function(ctx) return math.tointeger(tonumber(ctx.vars.max_cache_keys)) end,
        backup = true, idempotent = true, timeout = "2m", on_failure = "stop",
      }
      spec.when = function(ctx) return #list(ctx.vars.cache_patterns) > 0 end
      return spec
    end)()),
    pb.manual "post in the incident channel: rolled back to the stable commit; open the post-mortem",
  },
}
