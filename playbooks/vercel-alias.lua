-- playbooks/vercel-alias.lua: the automated rollback runbook, as a
-- playbook with its trigger.
--
--   1. find the last stable deployment   deployment_history (status 'stable'),
--                                        checked READY at Vercel
--   2. swap the alias                    every production alias to it (undo: back)
--   3. purge the CDN                     Vercel's edge cache, by tag
--   4. verify                            the aliases point at it and production
--                                        answers its health check
--   5. record the rollback               a 'rollback' row in deployment_history,
--                                        by the operator; the bad release
--                                        'rolled_back' (undo: removed)
--   6. monitor                           health every `monitor_every` for
--                                        `monitor_for`; a failure here stops the
--                                        run WITHOUT undoing the rollback: a
--                                        person decides what comes next
--
--   rbe plan  playbooks/vercel-alias.lua
--   rbe run   playbooks/vercel-alias.lua --reason "INC-1234"
--   rbe watch playbooks/vercel-alias.lua --yes     # the automation
--
-- The trigger: the app's request error rate (GET /api/metrics, the 5xx
-- share of /api/* requests between two checks) above `max_error_rate`
-- (5%) on 2 checks in a row, checked every 30 s; at most one rollback per
-- 30 minutes (rbe watch's cooldown).  Fewer than 20 requests between two
-- checks measure nothing and never fire.
--
-- Against the drill (drill/README.md) the Vercel API is the drill's fake:
-- production there moves, while the app the health check reaches is the
-- drill's own, which a Vercel alias does not change.  The health check is
-- the runbook's `curl -f`: HTTP 200 with the database and Redis up.
--   set -a; . /tmp/drill/drill.env; set +a; rbe run playbooks/vercel-alias.lua
local pb = require "rbe.playbook"
local pg = require "rbe.pg"
local http = require "rbe.http"

local vercel = require "vercel"
local health = require "health"

local format, concat = string.format, table.concat

---------------------------------------------------------------------------
-- helpers

local FIND = "find the last stable deployment"

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

local function client(ctx)
  return vercel.client { token = ctx.vars.vercel_token, base_url = ctx.vars.vercel_url,
    timeout = "10s" }
end

local function get_json(url)
  local ok, res = rbe.try(http.get, url, { timeout = "3s", raise = false, retries = 0 })
  if not ok then return nil, tostring(res.message or res) end
  local jok, body = pcall(res.json, res)
  return res.status, jok and body or res.body
end

-- the newest 'stable' release of deployment_history, and what production
-- is now (with its aliases: the ones to move)
local function find_stable(ctx)
  local row = db(ctx):query([[select version, git_sha, vercel_deployment_id as deployment,
      deployed_at::text as deployed_at from deployment_history
     where status = 'stable' and vercel_deployment_id is not null
     order by deployed_at desc limit 1]])[1]
  if not row then
    error(rbe.error("rollback", "deployment_history has no 'stable' release with a "
      .. "Vercel deployment: nothing to roll back to"), 0)
  end
  local c <close> = client(ctx)
  local d = c:deployment(row.deployment)
  if d.readyState ~= "READY" then
    error(rbe.error("rollback", format("the last stable release %s (%s) is %s at Vercel, "
      .. "not READY", row.version, row.deployment, tostring(d.readyState))), 0)
  end
  local cur = c:current(ctx.vars.project)
  local aliases = list(ctx.vars.aliases)
  if #aliases == 0 and cur and type(cur.alias) == "table" then
    for _, a in ipairs(cur.alias) do aliases[#aliases + 1] = a end
  end
  if #aliases == 0 then
    error(rbe.error("rollback", "no alias to move: pass --var aliases=host,..."), 0)
  end
  return {
    version = row.version, git_sha = row.git_sha, deployment = row.deployment,
    deployed_at = row.deployed_at, describe = vercel.describe(d), aliases = aliases,
    bad = cur and cur.id, bad_version = cur and cur.meta and cur.meta.appVersion,
  }
end

local function stable_of(ctx)
  local r = ctx.results[FIND]
  if type(r) == "table" then return r end
  return find_stable(ctx)          -- rbe plan: nothing has run
end

-- the runbook's health check: `curl -f $URL` (HTTP 200), database and
-- Redis up
local function healthy(ctx)
  return health.http(ctx.vars.health_url ~= "" and ctx.vars.health_url
    or (ctx.vars.app_url .. "/health"), { status = 200,
    json = { database = "ok", redis = "ok" }, timeout = "5s" })
end

---------------------------------------------------------------------------
-- the trigger's check: request error rate between two checks

local function error_rate(ctx)
  local status, m = get_json(ctx.vars.app_url .. "/api/metrics")
  if status ~= 200 or type(m) ~= "table" then
    return false, { reason = "metrics unavailable: " .. tostring(status or m), unknown = true }
  end
  local last = ctx.state.last
  ctx.state.last = { requests = m.requests, errors = m.errors, since = m.since }
  local req, errs, window = m.requests, m.errors, "since the app started"
  if last and last.since == m.since and m.requests >= last.requests then
    req, errs, window = m.requests - last.requests, m.errors - last.errors, "since the last check"
  end
  local min = tonumber(ctx.vars.min_requests) or 20
  if req < min then
    return false, { reason = format("%d requests %s: too few to measure", req, window),
      unknown = true, requests = req }
  end
  local rate, max = errs / req, tonumber(ctx.vars.max_error_rate) or 0.05
  return rate > max, {
    reason = format("error rate %.1f%% (%d of %d requests %s) %s %.1f%%", rate * 100, errs, req,
      window, rate > max and ">" or "<=", max * 100),
    rate = rate, errors = errs, requests = req,
  }
end

---------------------------------------------------------------------------

return pb.playbook "vercel: automated rollback to the last stable deployment" {
  description = "The automated rollback runbook: last stable deployment from "
    .. "deployment_history, alias swap, CDN purge, verify, record, monitor.",
  owner = "platform on-call",
  budget = "20m",
  trigger = {
    every = "30s", times = 2, cooldown = "30m", timeout = "10s",
    description = "request error rate above max_error_rate (5%) on 2 checks in a row, every 30 s",
    check = error_rate,
  },
  vars = {
    pg_url = { env = "DRILL_PG_URL", secret = true, required = true,
               doc = "the database with deployment_history" },
    vercel_url = { env = "DRILL_VERCEL_URL", default = "https://api.vercel.com" },
    vercel_token = { env = "DRILL_VERCEL_TOKEN", secret = true, required = true },
    project = { env = "DRILL_PROJECT", required = true },
    aliases = { default = "", doc = "hosts to move (default: every alias of production)" },
    cdn_tags = { default = "", doc = "edge cache tags to purge (default: the project)" },
    app_url = { env = "DRILL_APP_URL", required = true, doc = "for /api/metrics and /health" },
    health_url = { default = "", doc = "default: app_url/health" },
    max_error_rate = { default = "0.05" },
    min_requests = { default = "20" },
    monitor_for = { default = "10m" },
    monitor_every = { default = "30s" },
  },

  -------------------------------------------------------------------------
  pb.phase "1. roll back" { budget = "5m",
    pb.step(FIND) {
      idempotent = true, timeout = "30s",
      run = function(ctx)
        local s = find_stable(ctx)
        ctx.log("last stable: %s = %s; production now %s (%s); aliases %s", s.version,
          s.describe, tostring(s.bad), tostring(s.bad_version), concat(s.aliases, ", "))
        return s
      end,
      plan = function(ctx)
        local s = find_stable(ctx)
        return format("would roll back to %s = %s (from deployment_history); production is "
          .. "now %s (%s)", s.version, s.describe, tostring(s.bad), tostring(s.bad_version))
      end,
    },

    pb.step "swap the alias" (vercel.alias_step {
      token = function(ctx) return ctx.vars.vercel_token end,
      base_url = function(ctx) return ctx.vars.vercel_url end,
      project = function(ctx) return ctx.vars.project end,
      to = function(ctx, c) return c:deployment(stable_of(ctx).deployment) end,
      alias = function(ctx) return stable_of(ctx).aliases end,
      timeout = "1m",
    }),

    pb.step "purge the CDN" {
      idempotent = true, timeout = "30s", retries = 2, backoff = "1s",
      run = function(ctx)
        local tags = list(ctx.vars.cdn_tags)
        if #tags == 0 then tags = { ctx.vars.project } end
        local res = http.post(ctx.vars.vercel_url .. "/v1/edge-cache/invalidate-by-tags", {
          query = { projectIdOrName = ctx.vars.project }, json = { tags = tags },
          auth = { bearer = ctx.vars.vercel_token }, timeout = "10s" })
        ctx.log("edge cache purged for tags %s (HTTP %d)", concat(tags, ", "), res.status)
        return { tags = tags, status = res.status }
      end,
      plan = function(ctx)
        local tags = list(ctx.vars.cdn_tags)
        if #tags == 0 then tags = { ctx.vars.project } end
        return format("would purge Vercel's edge cache for tags %s (no undo: the cache refills)",
          concat(tags, ", "))
      end,
    },

    pb.gate "verify: production is the stable deployment and healthy" {
      every = "1s", pass = 3, within = "2m",
      check = function(ctx)
        local s = stable_of(ctx)
        local c <close> = client(ctx)
        for _, a in ipairs(s.aliases) do
          local on = c:alias_target(a)
          if on ~= s.deployment then fail("%s points at %s, not %s", a, tostring(on), s.deployment) end
        end
        return health.assert(healthy(ctx))
      end,
    },

    pb.step "record the rollback in deployment_history" {
      pg_tx = db,
      run = function(ctx, tx)
        local s = stable_of(ctx)
        local bad = tx:query("update deployment_history set status = 'rolled_back' "
          .. "where status = 'active' returning id")
        local row = tx:query([[insert into deployment_history (version, git_sha,
            vercel_deployment_id, status, deployed_by, notes)
          values ($1, $2, $3, 'rollback', $4, $5) returning id]], s.version, s.git_sha,
          s.deployment, ctx.user or "rbe", format("automated rollback from %s (%s), rbe run %s%s",
            tostring(s.bad_version), tostring(s.bad), ctx.run_id,
            ctx.reason and (": " .. ctx.reason) or ""))[1]
        local ids = {}
        for _, b in ipairs(bad) do ids[#ids + 1] = b.id end
        ctx.log("deployment_history: rollback row %d by %s", row.id, ctx.user or "rbe")
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
      plan = function()
        return "would insert a 'rollback' row by the operator into deployment_history and "
          .. "mark the active release 'rolled_back'; undo removes it"
      end,
    },
  },

  -------------------------------------------------------------------------
  pb.phase "2. monitor" {
    pb.step "monitor health" {
      on_failure = "stop", idempotent = true,
      run = function(ctx)
        local s = stable_of(ctx)
        local total, every = rbe.duration(ctx.vars.monitor_for), rbe.duration(ctx.vars.monitor_every)
        local t0, checks, bad_in_row = rbe.now(), 0, 0
        while true do
          checks = checks + 1
          local ok, ev = healthy(ctx)
          local c <close> = client(ctx)
          local on = c:alias_target(s.aliases[1])
          if on ~= s.deployment then
            ok, ev = false, { reason = format("%s was moved to %s", s.aliases[1], tostring(on)) }
          end
          if ok then bad_in_row = 0 else bad_in_row = bad_in_row + 1 end
          ctx.log("check %d at %.0fs: %s", checks, rbe.now() - t0, ok and "healthy" or ev.reason)
          if bad_in_row >= 2 then
            fail("unhealthy on 2 checks in a row after the rollback: %s (the rollback stays; "
              .. "decide by hand)", ev.reason)
          end
          if rbe.now() - t0 + every > total then break end
          rbe.sleep(every)
        end
        return { checks = checks, seconds = rbe.now() - t0 }
      end,
      plan = function(ctx)
        return format("would check health every %s for %s; two failures in a row stop the run "
          .. "(the rollback is NOT undone)", ctx.vars.monitor_every, ctx.vars.monitor_for)
      end,
    },
  },
}
