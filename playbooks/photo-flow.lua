-- playbooks/photo-flow.lua: the photo-first feature runbook (release 2.0.0),
-- as a playbook.  It switches the feature off without a redeploy and
-- keeps every photo taken while it was on:
--
--   1. turn the flag off        FEATURE_PHOTO_FIRST=false in .env, the
--                               feature_flags row, the flag in Redis' cache:flags;
--                               restart the app; verify it is healthy
--   2. prove the guard          an UPDATE of a photo field must now FAIL: the
--                               v2 trigger work_orders_photo_guard raises P0001
--                               while feature_flags.photo_first is off
--   3. snapshot the photos      every work order's photo fields into
--                               data_archive, BEFORE any schema change
--   4. schema rollback          optional (--var drop_columns=yes): drop the
--                               trigger, the index and the photo columns.
--                               Its undo is the runbook's restore function:
--                               columns, constraint, photo data (from the
--                               snapshot), index and trigger come back
--
--   rbe plan playbooks/photo-flow.lua
--   rbe run  playbooks/photo-flow.lua --reason "INC-1234" [--var drop_columns=yes]
--
-- Drop the columns only once the running app no longer reads them (v1):
-- the v2 app, even with the flag off, selects them for every work order.
-- The playbook verifies work orders are served after the drop; when they
-- are not, the restore function runs as the undo and the flag steps are
-- undone too (each restarts the app so the running process matches its
-- configuration).
--
-- The drop happens outside golang-migrate: schema_migrations still names
-- the v2 version afterwards.  A manual step says so; reconcile it with a
-- migration before the next deploy.
--
-- Vars default to the drill's drill.env keys (drill/README.md):
--   set -a; . /tmp/drill/drill.env; set +a; rbe run playbooks/photo-flow.lua
local pb = require "rbe.playbook"
local pg = require "rbe.pg"
local http = require "rbe.http"

local service = require "service"
local health = require "health"
local flags = require "flags"

local format, concat = string.format, table.concat

---------------------------------------------------------------------------
-- helpers

local SNAPSHOT = "snapshot the photo data into data_archive"

local function reveal(v) return v ~= nil and rbe.reveal(v) or nil end

local function fail(fmt, ...)
  error(rbe.error("verify", select("#", ...) > 0 and fmt:format(...) or fmt), 0)
end
local function dropping(ctx) return ctx.vars.drop_columns == "yes" end

local function decided(cond, why, plan)
  return function(ctx)
    if not cond(ctx) then return "skipped: " .. why(ctx) end
    return plan(ctx)
  end
end

local pools = {}
local function db(ctx)
  local key = reveal(ctx.vars.pg_url)
  if not pools[key] then pools[key] = pg.pool(ctx.vars.pg_url, { size = 4 }) end
  return pools[key]
end

local function where_db(url)
  local s = reveal(url):gsub("^%a[%w+.-]*://", ""):gsub("^[^@/]*@", ""):gsub("%?.*$", "")
  return s
end

local function pm2(ctx)
  return service.pm2 { pm2 = ctx.vars.pm2, home = ctx.vars.pm2_home ~= "" and ctx.vars.pm2_home or nil }
end

-- restart the app if pm2 runs it: after an undo of a configuration change,
-- so the running process matches the files again
local function restart_if_online(ctx)
  local st = pm2(ctx):status(ctx.vars.app_name)
  if st and st.status == "online" then
    local after = pm2(ctx):restart(ctx.vars.app_name, { wait = "30s" })
    ctx.log("pm2: %s restarted (pid %s)", ctx.vars.app_name, tostring(after.pid))
  end
end

local function get_json(url)
  local ok, res = rbe.try(http.get, url, { timeout = "3s", raise = false, retries = 0 })
  if not ok then return nil, tostring(res.message or res) end
  local jok, body = pcall(res.json, res)
  return res.status, jok and body or res.body
end

-- what the snapshot and the restore function call "photo data" (of the
-- table alias `a`, if any)
local function photo_rows(a)
  a = a and (a .. ".") or ""
  return format("(%sphoto_url is not null or %sphoto_taken_at is not null "
    .. "or %sphoto_status <> 'none' or %sphoto_first)", a, a, a, a)
end

local function tag(ctx) return "photo-flow rollback, rbe run " .. ctx.run_id end

local function has_photo_columns(q)
  return q:query("select count(*) as n from information_schema.columns where table_schema = "
    .. "current_schema() and table_name = 'work_orders' and column_name = 'photo_url'")[1].n > 0
end

---------------------------------------------------------------------------
-- the schema change and its restore function

local DROP = [[
DROP TRIGGER IF EXISTS work_orders_photo_guard ON work_orders;
DROP FUNCTION IF EXISTS work_orders_photo_guard();
DROP INDEX IF EXISTS work_orders_photo_status_idx;
ALTER TABLE work_orders DROP CONSTRAINT IF EXISTS work_orders_photo_status_check;
ALTER TABLE work_orders
  DROP COLUMN photo_url,
  DROP COLUMN photo_taken_at,
  DROP COLUMN photo_status,
  DROP COLUMN photo_first;
]]

-- restore_photos(): the runbook's restore function.  The columns and the
-- constraint as migration 20240610090000 made them, the photo data from
-- the snapshot (before the trigger is back: with the flag off it would
-- refuse the UPDATE), the partial index, then the guard trigger as
-- migration 20240610093000 made it.
local RESTORE_COLUMNS = [[
ALTER TABLE work_orders
  ADD COLUMN IF NOT EXISTS photo_url      text,
  ADD COLUMN IF NOT EXISTS photo_taken_at timestamptz,
  ADD COLUMN IF NOT EXISTS photo_status   text NOT NULL DEFAULT 'none',
  ADD COLUMN IF NOT EXISTS photo_first    boolean NOT NULL DEFAULT false;
ALTER TABLE work_orders DROP CONSTRAINT IF EXISTS work_orders_photo_status_check;
ALTER TABLE work_orders
  ADD CONSTRAINT work_orders_photo_status_check
  CHECK (photo_status IN ('none', 'pending', 'uploaded', 'processed', 'failed'));
]]

local RESTORE_DATA = [[
UPDATE work_orders w
   SET photo_url = a.data->>'photo_url',
       photo_taken_at = (a.data->>'photo_taken_at')::timestamptz,
       photo_status = a.data->>'photo_status',
       photo_first = (a.data->>'photo_first')::boolean
  FROM data_archive a
 WHERE a.source_table = 'work_orders' AND a.source_id = w.id AND a.reason = $1]]

local RESTORE_GUARD = [[
CREATE INDEX IF NOT EXISTS work_orders_photo_status_idx ON work_orders (photo_status)
  WHERE photo_status <> 'none';
CREATE OR REPLACE FUNCTION work_orders_photo_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF (NEW.photo_url IS DISTINCT FROM OLD.photo_url
      OR NEW.photo_taken_at IS DISTINCT FROM OLD.photo_taken_at
      OR NEW.photo_status IS DISTINCT FROM OLD.photo_status)
     AND NOT COALESCE((SELECT enabled FROM feature_flags WHERE name = 'photo_first'), false)
  THEN
    RAISE EXCEPTION 'photo fields of work order % are read-only while feature photo_first is off', OLD.id
      USING ERRCODE = 'P0001', HINT = 'enable the photo_first feature flag first';
  END IF;
  RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS work_orders_photo_guard ON work_orders;
CREATE TRIGGER work_orders_photo_guard
  BEFORE UPDATE OF photo_url, photo_taken_at, photo_status ON work_orders
  FOR EACH ROW EXECUTE FUNCTION work_orders_photo_guard();
]]

local function restore_photos(ctx, tx, reason)
  tx:exec(RESTORE_COLUMNS)
  local n = tx:query(RESTORE_DATA, reason).affected
  tx:exec(RESTORE_GUARD)
  return n
end

---------------------------------------------------------------------------
-- flag steps (flags module); the .env one restarts the app on undo

local function env_flag()
  local spec = flags.env_step {
    path = function(ctx) return ctx.vars.env_file end,
    key = function(ctx) return ctx.vars.env_flag end,
    value = "false", idempotent = true,
  }
  local undo = spec.undo
  spec.undo = function(ctx)
    undo(ctx)
    restart_if_online(ctx)
  end
  return spec
end

local function pm2_restart()
  local spec = service.pm2_restart_step {
    name = function(ctx) return ctx.vars.app_name end,
    pm2 = function(ctx) return ctx.vars.pm2 end,
    home = function(ctx) return ctx.vars.pm2_home ~= "" and ctx.vars.pm2_home or nil end,
    wait = "30s", timeout = "1m",
  }
  spec.idempotent = true
  return spec
end


---------------------------------------------------------------------------

return pb.playbook "photo-first: switch the feature off, keep the photos" {
  description = "The photo-first runbook: flag off, restart, prove the guard, snapshot, "
    .. "optional schema rollback with a restore function as its undo.",
  owner = "field-app team",
  budget = "15m",
  vars = {
    drop_columns = { default = "no", doc = "yes: also drop the photo columns (app must be v1)" },
    app_url = { env = "DRILL_APP_URL", required = true },
    app_name = { env = "DRILL_APP_NAME", default = "drill-app" },
    pm2 = { env = "DRILL_PM2", default = "pm2" },
    pm2_home = { env = "DRILL_PM2_HOME", default = "" },
    env_file = { env = "DRILL_ENV_FILE", required = true },
    env_flag = { env = "DRILL_FEATURE_FLAG", default = "FEATURE_PHOTO_FIRST" },
    db_flag = { default = "photo_first", doc = "the feature_flags row" },
    pg_url = { env = "DRILL_PG_URL", secret = true, required = true },
    redis_url = { env = "DRILL_REDIS_URL", required = true },
    redis_flags_key = { default = "cache:flags", doc = "a JSON object of flags in Redis" },
  },

  -------------------------------------------------------------------------
  pb.phase "1. turn the flag off" { budget = "3m",
    pb.parallel {
      pb.step ".env: FEATURE_PHOTO_FIRST=false" (env_flag()),
      pb.step "feature_flags: photo_first off" (flags.pg_step {
        db = function(ctx) return db(ctx) end,
        name = function(ctx) return ctx.vars.db_flag end,
        value = false, idempotent = true,
        by = function(ctx) return ctx.user end,
      }),
      pb.step "redis: cache:flags photo_first off" (flags.redis_step {
        redis = function(ctx) return ctx.vars.redis_url end,
        key = function(ctx) return ctx.vars.redis_flags_key end,
        json = function(ctx) return ctx.vars.db_flag end,
        value = false, idempotent = true,
      }),
    },
    pb.step "pm2: restart the app with the flag off" (pm2_restart()),
    pb.gate "verify: healthy with photo-first off" {
      every = "500ms", pass = 3, within = "1m",
      check = function(ctx)
        health.assert(health.http(ctx.vars.app_url .. "/health", { status = 200,
          json = { status = "ok", database = "ok", redis = "ok" }, timeout = "2s" }))
        local _, v = get_json(ctx.vars.app_url .. "/api/version")
        if type(v) == "table" and type(v.features) == "table" and v.features.photo_first == true then
          fail("the app still reports features.photo_first = true")
        end
        return true
      end,
    },
  },

  -------------------------------------------------------------------------
  pb.phase "2. prove the guard" { budget = "1m",
    -- The UPDATE runs in a transaction that is always rolled back: the
    -- gate passes only when the database REFUSES it (SQLSTATE P0001).
    pb.gate "verify: photo updates are blocked by the trigger" {
      every = "500ms", pass = 1, within = "30s",
      check = function(ctx)
        local row = db(ctx):query("select id from work_orders where photo_url is not null "
          .. "order by id limit 1")[1]
        if not row then fail("no work order has a photo: nothing to prove it on") end
        local ok, err = rbe.try(db(ctx).tx, db(ctx), function(tx)
          tx:query("update work_orders set photo_url = photo_url || '#probe' where id = $1", row.id)
          error(rbe.error("probe", "went through"), 0)
        end)
        if ok or (rbe.is_error(err) and err.kind == "probe") then
          fail("the photo UPDATE of work order %d went through (rolled back): "
            .. "the guard is not active", row.id)
        end
        if err.code ~= "P0001" then error(err, 0) end
        ctx.log("work order %d: UPDATE refused (P0001): %s", row.id,
          tostring(err.message):match("^[^\n]*"))
        return true
      end,
    },
  },

  -------------------------------------------------------------------------
  pb.phase "3. snapshot the photos" { budget = "2m",
    -- exactly once: the rows and rbe's step marker commit together
    pb.step(SNAPSHOT) {
      pg_tx = db,
      run = function(ctx, tx)
        local n = tx:query([[
          insert into data_archive (source_table, source_id, data, reason, archived_by)
          select 'work_orders', id,
                 jsonb_build_object('photo_url', photo_url, 'photo_taken_at', photo_taken_at,
                                    'photo_status', photo_status, 'photo_first', photo_first),
                 $1, $2
            from work_orders where ]] .. photo_rows(), tag(ctx), ctx.user or "rbe").affected
        ctx.log("%d work orders' photo data archived (data_archive, reason '%s')", n, tag(ctx))
        return { archived = n, reason = tag(ctx) }
      end,
      undo = function(ctx)
        local r = ctx.results[ctx.step]
        local reason = type(r) == "table" and r.reason or tag(ctx)
        local n = db(ctx):query("delete from data_archive where source_table = 'work_orders' "
          .. "and reason = $1", reason).affected
        ctx.log("%d archived rows removed", n)
      end,
      plan = function(ctx)
        local n = db(ctx):with(function(q)
          if not has_photo_columns(q) then return nil end
          return q:query("select count(*) as n from work_orders where " .. photo_rows())[1].n
        end)
        if not n then return "nothing: work_orders has no photo columns" end
        return format("would copy the photo fields of %d work orders into data_archive "
          .. "(postgres at %s); undo deletes those rows", n, where_db(ctx.vars.pg_url))
      end,
    },
    pb.gate "verify: every photo is in the archive" {
      every = "500ms", pass = 1, within = "30s",
      check = function(ctx)
        local r = db(ctx):query([[select
            (select count(*) from work_orders where ]] .. photo_rows() .. [[) as photos,
            (select count(distinct source_id) from data_archive
              where source_table = 'work_orders' and reason = $1) as archived]], tag(ctx))[1]
        if r.archived < r.photos then
          fail("%d of %d work orders with photos archived", r.archived, r.photos)
        end
        return true
      end,
    },
  },

  -------------------------------------------------------------------------
  pb.phase "4. schema rollback (optional)" { budget = "5m",
    pb.step "drop the photo columns" {
      when = dropping, pg_tx = db, timeout = "4m",
      confirm = "This drops work_orders.photo_url, photo_taken_at, photo_status and "
        .. "photo_first (their data is in data_archive).",
      run = function(ctx, tx)
        -- photos added since the snapshot are archived too, in this transaction
        local late = tx:query([[
          insert into data_archive (source_table, source_id, data, reason, archived_by)
          select 'work_orders', w.id,
                 jsonb_build_object('photo_url', w.photo_url, 'photo_taken_at', w.photo_taken_at,
                                    'photo_status', w.photo_status, 'photo_first', w.photo_first),
                 $1, $2
            from work_orders w
           where ]] .. photo_rows("w") .. [[ and not exists (select 1 from data_archive a where a.source_table = 'work_orders'
                             and a.source_id = w.id and a.reason = $1)]],
          tag(ctx), ctx.user or "rbe").affected
        if late > 0 then ctx.log("%d photos added since the snapshot archived too", late) end
        tx:exec(DROP)
        ctx.log("dropped the guard trigger, work_orders_photo_status_idx and the 4 photo columns")
        return { dropped = true, reason = tag(ctx), late = late }
      end,
      -- the restore function
      undo = function(ctx)
        local r = ctx.results[ctx.step]
        local reason = type(r) == "table" and r.reason or tag(ctx)
        local n = db(ctx):tx(function(tx) return restore_photos(ctx, tx, reason) end)
        ctx.log("restore function: photo columns, constraint, index and trigger back; "
          .. "%d work orders' photo data restored", n)
      end,
      plan = decided(dropping, function() return "drop_columns=no (the columns stay)" end,
        function(ctx)
          return {
            "would drop trigger work_orders_photo_guard, index work_orders_photo_status_idx, "
              .. "constraint work_orders_photo_status_check and columns photo_url, "
              .. "photo_taken_at, photo_status, photo_first of work_orders, in one transaction",
            "undo: the restore function (columns, constraint, data from the snapshot, index, trigger)",
          }
        end),
    },
    pb.gate "verify: work orders are still served" {
      when = dropping, every = "500ms", pass = 3, within = "15s",
      check = function(ctx)
        -- ids beyond what the cache holds: the database answers
        local ids = db(ctx):query("select id from work_orders order by id desc limit 3")
        for _, r in ipairs(ids) do
          local status, body = get_json(ctx.vars.app_url .. "/api/work-orders/" .. r.id)
          if status ~= 200 then
            fail("GET /api/work-orders/%d -> %s %s", r.id, tostring(status),
              type(body) == "table" and tostring(body.error) or tostring(body))
          end
        end
        return true
      end,
    },
    pb.manual "reconcile schema_migrations with a migration" {
      when = dropping,
      text = "schema_migrations still names the v2 version, but the photo columns are gone: "
        .. "add a migration that drops them before the next deploy",
    },
  },

  pb.manual "tell the photo-first pilot organisations the feature is paused",
}
