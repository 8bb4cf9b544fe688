-- playbooks/attachments.lua: the message attachments runbook (release
-- 2.0.0), as a playbook.
--
--   1. revert the app          git checkout of the stable tag, build, pm2 restart
--   2. verify mediaUrl         the v1 API must still return every message's
--                              mediaUrl (v2 kept messages.media_url up to date)
--   3. database, one option    (--var option=A|B|C; a pg_dump is taken first)
--      A  clear ONLY the backfilled attachments (copies of media_url), in one
--         transaction, with the counts before and after; the attachments
--         users uploaded with v2 stay.  Undo puts the rows back (ids kept).
--      B  drop the attachments schema: index, constraint, messages.
--         attachment_count and the message_attachments table; every row is
--         archived in data_archive first.  Undo rebuilds it from there.
--      C  restore the pre-deploy dump, terminating the other connections
--         first: exact v1, but rows written since the deploy are lost.  If
--         the restore fails half-way (a damaged dump), the database is put
--         back from the dump taken in this run before the step fails.
--   4. verify                  mediaUrl again, health, messages kept (A, B)
--
--   rbe plan playbooks/attachments.lua --var option=A
--   rbe run  playbooks/attachments.lua --var option=A --reason "INC-1234"
--
-- A and B change the schema or the data outside golang-migrate:
-- schema_migrations still names v2 afterwards (a manual step says so).
--
-- Vars default to the drill's drill.env keys (drill/README.md):
--   set -a; . /tmp/drill/drill.env; set +a; rbe run playbooks/attachments.lua
local pb = require "rbe.playbook"
local pg = require "rbe.pg"
local http = require "rbe.http"
local fs = require "rbe.fs"
local json = require "rbe.json"

local service = require "service"
local health = require "health"
local backup = require "backup"

local format, concat = string.format, table.concat

---------------------------------------------------------------------------
-- helpers

local BACKUP = "back up the database (pg_dump)"

local function reveal(v) return v ~= nil and rbe.reveal(v) or nil end
local function option(x) return function(ctx) return ctx.vars.option == x end end
local function not_c(ctx) return ctx.vars.option ~= "C" end

local function fail(fmt, ...)
  error(rbe.error("verify", select("#", ...) > 0 and fmt:format(...) or fmt), 0)
end

local function decided(cond, plan)
  return function(ctx)
    if not cond(ctx) then return "skipped: option=" .. tostring(ctx.vars.option) end
    return plan(ctx)
  end
end

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

local function get_json(url)
  local ok, res = rbe.try(http.get, url, { timeout = "3s", raise = false, retries = 0 })
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

local function build(ctx, log)
  return service.build { dir = ctx.vars.app_dir, timeout = "5m", log = log,
    cmds = { { "npm", "install", "--no-audit", "--no-fund" }, { "npm", "run", "build" } } }
end

local function tag(ctx) return "attachments rollback, rbe run " .. ctx.run_id end

local function table_exists(q, name)
  return q:query("select to_regclass($1) is not null as x", name)[1].x
end

local function attachment_counts(q)
  if not table_exists(q, "message_attachments") then return { table = false } end
  return q:query([[select true as table, count(*) as total,
    count(*) filter (where backfilled) as backfilled,
    count(*) filter (where not backfilled) as uploaded,
    count(distinct message_id) as messages from message_attachments]])[1]
end

local function describe_counts(c)
  if not c.table then return "no message_attachments table" end
  return format("%d attachments (%d backfilled, %d uploaded) on %d messages", c.total,
    c.backfilled, c.uploaded, c.messages)
end

---------------------------------------------------------------------------
-- dumps and restores

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

local function backup_of(ctx)
  local b = ctx.results[BACKUP]
  if type(b) ~= "table" or not b.path then
    error(rbe.error("restore", "no dump of this run (step '" .. BACKUP .. "' has no result)"), 0)
  end
  return b.path
end

---------------------------------------------------------------------------
-- option A: the backfilled attachments

local CLEAR_A = {
  [[insert into data_archive (source_table, source_id, data, reason, archived_by)
    select 'message_attachments', a.id, to_jsonb(a), $1, $2
      from message_attachments a where a.backfilled]],
  [[insert into data_archive (source_table, source_id, data, reason, archived_by)
    select 'messages', m.id, jsonb_build_object('attachment_count', m.attachment_count), $1, $2
      from messages m
     where exists (select 1 from message_attachments a where a.message_id = m.id and a.backfilled)]],
  [[delete from message_attachments where backfilled]],
  [[update messages m
       set attachment_count = (select count(*) from message_attachments a where a.message_id = m.id)
     where m.id in (select source_id from data_archive
                     where source_table = 'messages' and reason = $1)]],
}

local function undo_a(ctx, tx, reason)
  local n = tx:query([[insert into message_attachments
    select (jsonb_populate_record(null::message_attachments, data)).*
      from data_archive where source_table = 'message_attachments' and reason = $1
     order by source_id]], reason).affected
  tx:query([[update messages m set attachment_count = (a.data->>'attachment_count')::int
      from data_archive a
     where a.source_table = 'messages' and a.source_id = m.id and a.reason = $1]], reason)
  tx:query("delete from data_archive where reason = $1", reason)
  return n
end

---------------------------------------------------------------------------
-- option B: the attachments schema

local DROP_B = [[
DROP INDEX IF EXISTS message_attachments_message_id_idx;
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_attachment_count_check;
ALTER TABLE messages DROP COLUMN IF EXISTS attachment_count;
DROP TABLE IF EXISTS message_attachments;
]]

-- as migration 20240610091000 and 20240610092000 made them, without the
-- backfill: the rows come back from the archive with their ids
local REBUILD_B = [[
CREATE TABLE message_attachments (
  id           bigserial PRIMARY KEY,
  message_id   bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
  media_url    text NOT NULL,
  content_type text NOT NULL DEFAULT 'image/jpeg',
  size_bytes   integer,
  backfilled   boolean NOT NULL DEFAULT false,
  created_at   timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE messages ADD COLUMN attachment_count integer NOT NULL DEFAULT 0;
]]

local FINISH_B = [[
SELECT setval(pg_get_serial_sequence('message_attachments', 'id'),
              greatest((SELECT max(id) FROM message_attachments), 1));
ALTER TABLE messages
  ADD CONSTRAINT messages_attachment_count_check CHECK (attachment_count >= 0);
CREATE INDEX message_attachments_message_id_idx ON message_attachments (message_id);
]]

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

return pb.playbook "message attachments: back to a single mediaUrl" {
  description = "The message attachments runbook: revert the app, verify mediaUrl, then "
    .. "option A (clear backfilled), B (drop the schema) or C (restore the dump).",
  owner = "messaging team",
  budget = "20m",
  vars = {
    option = { default = "A", doc = "A: clear backfilled | B: drop the schema | C: restore the dump" },
    app_dir = { env = "DRILL_APP_DIR", required = true },
    app_url = { env = "DRILL_APP_URL", required = true },
    app_name = { env = "DRILL_APP_NAME", default = "drill-app" },
    stable_ref = { env = "DRILL_APP_V1_TAG", default = "v1" },
    pm2 = { env = "DRILL_PM2", default = "pm2" },
    pm2_home = { env = "DRILL_PM2_HOME", default = "" },
    pg_url = { env = "DRILL_PG_URL", secret = true, required = true },
    pg_admin_url = { env = "DRILL_PG_ADMIN_URL", secret = true, default = "" },
    pg_bindir = { env = "DRILL_PG_BINDIR", default = "" },
    predeploy_dump = { env = "DRILL_PREDEPLOY_DUMP", default = "" },
    backup_dir = { env = "DRILL_BACKUP_DIR", default = "" },
    schema_target = { env = "DRILL_SCHEMA_V1", default = "", doc = "the dump's version (option C)" },
  },

  -------------------------------------------------------------------------
  pb.phase "1. revert the app" { budget = "5m",
    pb.step "git: check out the stable release and build" {
      timeout = "4m",
      check = function(ctx)
        local want = git(ctx):rev(ctx.vars.stable_ref)
        return git(ctx):head().sha == want and built_commit(ctx) == want
      end,
      run = function(ctx)
        local rec = git(ctx):checkout(ctx.vars.stable_ref,
          { message = "rbe run " .. ctx.run_id .. ": before checkout of " .. ctx.vars.stable_ref })
        local b = build(ctx, ctx.run_dir .. "/build.log")
        ctx.log("%s checked out and built in %.1fs", ctx.vars.stable_ref, b.elapsed)
        return rec
      end,
      undo = function(ctx)
        local rec = ctx.results[ctx.step]
        if type(rec) ~= "table" or not rec.previous then return end
        git(ctx):restore(rec)
        build(ctx, ctx.run_dir .. "/build-undo.log")
        local st = pm2(ctx):status(ctx.vars.app_name)
        if st and st.status == "online" then pm2(ctx):restart(ctx.vars.app_name, { wait = "30s" }) end
        ctx.log("back at %s, rebuilt and restarted", rec.previous_branch or rec.previous:sub(1, 12))
      end,
      plan = function(ctx)
        local g = git(ctx)
        local head = g:head()
        return format("would check out %s (%s) in %s (now %s), npm install, npm run build; "
          .. "undo goes back, rebuilds and restarts", ctx.vars.stable_ref,
          g:rev(ctx.vars.stable_ref):sub(1, 12), ctx.vars.app_dir, head.branch or head.sha:sub(1, 12))
      end,
    },
    pb.step "pm2: restart the app" (pm2_restart()),
  },

  -------------------------------------------------------------------------
  pb.phase "2. verify mediaUrl" { budget = "2m",
    pb.gate "verify: the API returns every message's mediaUrl" {
      every = "500ms", pass = 2, within = "1m",
      check = function(ctx)
        local status, v = get_json(ctx.vars.app_url .. "/api/version")
        local want = git(ctx):rev(ctx.vars.stable_ref)
        if status ~= 200 or type(v) ~= "table" or v.commit ~= want then
          fail("the app does not run %s yet (/api/version -> %s)", ctx.vars.stable_ref,
            type(v) == "table" and tostring(v.commit):sub(1, 12) or tostring(status))
        end
        -- the oldest and the newest messages with media, v1's and v2's
        local rows = db(ctx):query([[
          (select id, media_url from messages where media_url is not null order by id limit 3)
          union all
          (select id, media_url from messages where media_url is not null order by id desc limit 3)]])
        for _, r in ipairs(rows) do
          local s, m = get_json(ctx.vars.app_url .. "/api/messages/" .. r.id)
          if s ~= 200 or type(m) ~= "table" then fail("GET /api/messages/%d -> %s", r.id, tostring(s)) end
          if m.mediaUrl ~= r.media_url then
            fail("message %d: mediaUrl is %s, the database has %s", r.id, tostring(m.mediaUrl),
              r.media_url)
          end
        end
        return true
      end,
    },
  },

  -------------------------------------------------------------------------
  pb.phase "3. database" { budget = "10m",
    pb.step(BACKUP) {
      idempotent = true, timeout = "10m",
      run = function(ctx)
        local b = dump_database(ctx, ctx.run_id .. "-before-attachments")
        b.messages = db(ctx):query("select count(*) as n from messages")[1].n
        ctx.log("pg_dump: %s (%d bytes; %d messages)", b.path, b.bytes, b.messages)
        return b
      end,
      plan = function(ctx)
        return format("would pg_dump %s into %s/<run id>-before-attachments-<time>.dump",
          where_db(ctx.vars.pg_url), ctx.vars.backup_dir ~= "" and ctx.vars.backup_dir or "<run dir>")
      end,
    },

    pb.step "option A: clear only the backfilled attachments" {
      when = option("A"), pg_tx = db, timeout = "5m",
      confirm = "Deletes the attachments that v2 backfilled from messages.media_url "
        .. "(archived in data_archive first).",
      run = function(ctx, tx)
        local before = attachment_counts(tx)
        if not before.table then error(rbe.error("attachments", "there is no message_attachments table"), 0) end
        for _, sql in ipairs(CLEAR_A) do
          if sql:find("$2", 1, true) then tx:query(sql, tag(ctx), ctx.user or "rbe")
          elseif sql:find("$1", 1, true) then tx:query(sql, tag(ctx))
          else tx:query(sql) end
        end
        local after = attachment_counts(tx)
        ctx.log("before: %s", describe_counts(before))
        ctx.log("after:  %s", describe_counts(after))
        if after.uploaded ~= before.uploaded then
          error(rbe.error("attachments", format("uploaded attachments changed (%d -> %d): "
            .. "rolled back", before.uploaded, after.uploaded)), 0)
        end
        return { reason = tag(ctx), before = before, after = after }
      end,
      undo = function(ctx)
        local r = ctx.results[ctx.step]
        local reason = type(r) == "table" and r.reason or tag(ctx)
        local n = db(ctx):tx(function(tx) return undo_a(ctx, tx, reason) end)
        ctx.log("%d backfilled attachments put back", n)
      end,
      plan = decided(option("A"), function(ctx)
        local c = db(ctx):with(attachment_counts)
        if not c.table then return "nothing: there is no message_attachments table" end
        return {
          format("now: %s", describe_counts(c)),
          format("would archive and delete the %d backfilled attachments in one transaction "
            .. "(the %d uploaded ones stay); undo puts them back", c.backfilled, c.uploaded),
        }
      end),
    },

    pb.step "option B: drop the attachments index, constraint and columns" {
      when = option("B"), pg_tx = db, timeout = "5m",
      confirm = "Drops message_attachments, messages.attachment_count, its constraint and "
        .. "index (every row archived in data_archive first).",
      run = function(ctx, tx)
        local before = attachment_counts(tx)
        if before.table then
          tx:query([[insert into data_archive (source_table, source_id, data, reason, archived_by)
            select 'message_attachments', a.id, to_jsonb(a), $1, $2 from message_attachments a]],
            tag(ctx), ctx.user or "rbe")
        end
        local has_count = tx:query("select count(*) as n from information_schema.columns "
          .. "where table_name = 'messages' and column_name = 'attachment_count'")[1].n > 0
        if has_count then
          tx:query([[insert into data_archive (source_table, source_id, data, reason, archived_by)
            select 'messages', id, jsonb_build_object('attachment_count', attachment_count), $1, $2
              from messages where attachment_count <> 0]], tag(ctx), ctx.user or "rbe")
        end
        tx:exec(DROP_B)
        ctx.log("archived %s, then dropped the index, the constraint, "
          .. "messages.attachment_count and message_attachments", describe_counts(before))
        return { reason = tag(ctx), before = before }
      end,
      undo = function(ctx)
        local r = ctx.results[ctx.step]
        local reason = type(r) == "table" and r.reason or tag(ctx)
        db(ctx):tx(function(tx)
          tx:exec(REBUILD_B)
          undo_a(ctx, tx, reason)
          tx:exec(FINISH_B)
        end)
        ctx.log("message_attachments and messages.attachment_count rebuilt from data_archive")
      end,
      plan = decided(option("B"), function(ctx)
        local c = db(ctx):with(attachment_counts)
        return {
          format("now: %s", describe_counts(c)),
          "would archive every attachment and attachment_count into data_archive, then drop "
            .. "index message_attachments_message_id_idx, constraint "
            .. "messages_attachment_count_check, column messages.attachment_count and table "
            .. "message_attachments, in one transaction; undo rebuilds them from the archive",
        }
      end),
    },

    pb.step "option C: restore the pre-deploy dump" {
      when = option("C"), idempotent = true, timeout = "9m",
      confirm = "Terminates every connection, DROPS the database and restores the pre-deploy "
        .. "dump: rows written since the deploy are lost (they are in this run's dump).",
      run = function(ctx)
        local ok, err = rbe.try(restore_database, ctx, ctx.vars.predeploy_dump)
        if not ok then
          if err.dropped then
            ctx.log("the restore failed after the drop (%s); putting the database back from %s",
              tostring(err.message):match("^[^\n]*"), backup_of(ctx))
            restore_database(ctx, backup_of(ctx))
            err.message = "the restore failed and the database was put back from "
              .. backup_of(ctx) .. ": " .. tostring(err.message)
          end
          error(err, 0)
        end
        return { dump = ctx.vars.predeploy_dump }
      end,
      undo = function(ctx) restore_database(ctx, backup_of(ctx)) end,
      plan = decided(option("C"), function(ctx)
        local d = ctx.vars.predeploy_dump
        return {
          format("would terminate the connections to %s, drop it, create it again and "
            .. "pg_restore %s%s", where_db(ctx.vars.pg_url), d,
            fs.exists(d) and "" or " (MISSING: the step will fail before dropping anything)"),
          "a restore that fails half-way puts this run's dump back; undo does the same",
        }
      end),
    },

    pb.gate "verify: the database is as the option wants" {
      every = "500ms", pass = 1, within = "30s",
      check = function(ctx)
        local opt = ctx.vars.option
        return db(ctx):with(function(q)
          if opt == "A" then
            local c = attachment_counts(q)
            if not c.table or c.backfilled ~= 0 then fail("still: %s", describe_counts(c)) end
          elseif opt == "B" then
            if table_exists(q, "message_attachments") then fail("message_attachments still exists") end
          else
            local v = q:query("select version::text as v, dirty from schema_migrations")[1]
            if ctx.vars.schema_target ~= "" and (not v or v.v ~= ctx.vars.schema_target or v.dirty) then
              fail("schema_migrations is %s, want %s", v and v.v or "empty", ctx.vars.schema_target)
            end
            if table_exists(q, "message_attachments") then fail("message_attachments still exists") end
          end
          return true
        end)
      end,
    },
  },

  -------------------------------------------------------------------------
  pb.phase "4. verify" { budget = "2m",
    pb.parallel {
      pb.gate "verify: mediaUrl after the database change" {
        every = "500ms", pass = 2, within = "1m",
        check = function(ctx)
          local rows = db(ctx):query("select id, media_url from messages where media_url is not null "
            .. "order by id desc limit 5")
          for _, r in ipairs(rows) do
            local s, m = get_json(ctx.vars.app_url .. "/api/messages/" .. r.id)
            if s ~= 200 or type(m) ~= "table" or m.mediaUrl ~= r.media_url then
              fail("GET /api/messages/%d -> %s, mediaUrl %s", r.id, tostring(s),
                type(m) == "table" and tostring(m.mediaUrl) or "?")
            end
          end
          return true
        end,
      },
      pb.gate "verify: every message is kept" {
        when = not_c, every = "500ms", pass = 1, within = "30s",
        check = function(ctx)
          local before = (ctx.results[BACKUP] or {}).messages or 0
          local now = db(ctx):query("select count(*) as n from messages")[1].n
          if now < before then fail("%d messages, %d before the change", now, before) end
          return true
        end,
      },
      pb.gate "verify: health is ok" {
        every = "500ms", pass = 3, within = "1m",
        check = function(ctx)
          return health.assert(health.http(ctx.vars.app_url .. "/health", { status = 200,
            json = { status = "ok", database = "ok", redis = "ok" }, timeout = "2s" }))
        end,
      },
    },
    pb.manual "reconcile schema_migrations with a migration" {
      when = not_c,
      text = "option A/B changed the attachments outside golang-migrate: write the migration "
        .. "that matches before the next deploy",
    },
  },
}
