-- modules/flags.lua: env files (parsing every form dotenv accepts, atomic
-- rewrites, the kept copy, restore), a PostgreSQL flags table in a
-- database of this spec's own (dropped at the end), Redis keys, hash
-- fields and JSON documents under a per-run prefix, and the three steps
-- undone together by a real playbook run.
local rbe = require "rbe"
local redis = require "rbe.redis"
local pg = require "rbe.pg"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local flags = require "flags"

local REDIS_URL = rbe.env("RBE_TEST_REDIS_URL")
local PG_URL = rbe.env("RBE_TEST_PG_URL")
local ADMIN_URL = rbe.env("RBE_TEST_PG_ADMIN_URL")
local DBNAME = "rbe_flags_spec_" .. tostring(rbe.now()):gsub("%D", ""):sub(-9)
local P = ("rbef%d%d:"):format(os.time() % 100000, math.random(1, 1e6))
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local RBE = os.getenv("RBE_BIN") or (HERE .. "/../../build/bin/rbe")

local function raises(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return err
end

local function db_url()
  return (PG_URL:gsub("/[^/?]*$", "/" .. DBNAME))
end

local tmp
setup(function()
  tmp = fs.tmpdir("rbe-flags-spec-")
  local admin <close> = pg.connect(ADMIN_URL)
  admin:exec("create database " .. DBNAME .. " owner rbe")
  local db <close> = pg.connect(db_url())
  db:exec([[
    create table feature_flags (
      name text primary key, enabled boolean not null default false,
      description text, updated_at timestamptz not null default now(), updated_by text);
    insert into feature_flags (name, enabled, updated_at, updated_by) values
      ('photo_first', true, now() - interval '3 hours', 'deploy-bot'),
      ('dark_mode', true, now() - interval '3 days', 'deploy-bot');
    create schema app;
    create table app.settings (key text primary key, value jsonb);
    insert into app.settings values ('limits', '{"rps": 10}')]])
end)

teardown(function()
  local admin <close> = pg.connect(ADMIN_URL)
  admin:exec("drop database if exists " .. DBNAME .. " with (force)")
  local r <close> = redis.connect(REDIS_URL)
  r:unlink_matching(P .. "*")
  if tmp then fs.remove(tmp, { recursive = true }) end
end)

local function envfile(name, text, mode)
  local path = tmp .. "/" .. name
  fs.write(path, text, { mode = mode or "0640" })
  return path
end

---------------------------------------------------------------------------

describe("flags in env files", function()
  local SAMPLE = table.concat({
    "# app settings",
    "NODE_ENV=production",
    "export FEATURE_PHOTO_FIRST=true   # turned on for v2",
    "  GREETING='hello # not a comment'",
    'MULTI="line one',
    'line \\"two\\""',
    "EMPTY=",
    "DATABASE_URL=postgresql://app:pw@db/app",
    "FEATURE_PHOTO_FIRST=true",
    "",
  }, "\n")

  it("reads every form: export, comments, quotes, multi-line, the last assignment", function()
    local path = envfile("read.env", SAMPLE)
    assert.are.equal("production", flags.get_env(path, "NODE_ENV"))
    assert.are.equal("true", flags.get_env(path, "FEATURE_PHOTO_FIRST"))
    assert.are.equal("hello # not a comment", flags.get_env(path, "GREETING"))
    assert.are.equal('line one\nline "two"', flags.get_env(path, "MULTI"))
    assert.are.equal("", flags.get_env(path, "EMPTY"))
    assert.are.equal("postgresql://app:pw@db/app", flags.get_env(path, "DATABASE_URL"))
    assert.is_nil(flags.get_env(path, "MISSING"))
  end)

  it("set_env rewrites every assignment, keeps the rest, the mode and a copy", function()
    local path = envfile("set.env", SAMPLE, "0600")
    local res = flags.set_env(path, "FEATURE_PHOTO_FIRST", false)
    assert.are.same({ key = "FEATURE_PHOTO_FIRST", previous = "true", existed = true,
      value = "false", changed = true, path = path, backup = path .. ".rbe-backup" }, res)
    local text = fs.read(path)
    assert.truthy(text:find("\nexport FEATURE_PHOTO_FIRST=false\n", 1, true), text)
    assert.truthy(text:find("\nFEATURE_PHOTO_FIRST=false\n", 1, true), text)
    assert.truthy(text:find("  GREETING='hello # not a comment'\n", 1, true))
    assert.truthy(text:find('MULTI="line one\nline \\"two\\""\n', 1, true))
    assert.are.equal(SAMPLE, fs.read(path .. ".rbe-backup"))
    assert.are.equal(tonumber("600", 8), fs.stat(path).mode)
    assert.are.equal(tonumber("600", 8), fs.stat(path .. ".rbe-backup").mode)
    assert.are.equal("false", flags.get_env(path, "FEATURE_PHOTO_FIRST"))
    -- nothing to change: no rewrite, no new copy
    fs.remove(path .. ".rbe-backup")
    assert.is_false(flags.set_env(path, "FEATURE_PHOTO_FIRST", "false").changed)
    assert.is_false(fs.exists(path .. ".rbe-backup"))
  end)

  it("appends a missing key, quotes values that need it, and restores the copy", function()
    local path = envfile("new.env", "A=1")            -- no final newline
    local res = flags.set_env(path, "NOTE", 'two words "quoted" # x')
    assert.is_false(res.existed)
    assert.is_nil(res.previous)
    assert.are.equal('A=1\nNOTE="two words \\"quoted\\" # x"\n', fs.read(path))
    assert.are.equal('two words "quoted" # x', flags.get_env(path, "NOTE"))
    flags.set_env(path, "GREETING", "hi", { backup = false })
    assert.are.equal("A=1", fs.read(path .. ".rbe-backup"))
    flags.restore_env(path)
    assert.are.equal("A=1", fs.read(path))
    local r = flags.unset_env(envfile("unset.env", SAMPLE), "FEATURE_PHOTO_FIRST")
    assert.are.equal("true", r.previous)
    assert.is_nil(flags.get_env(r.path, "FEATURE_PHOTO_FIRST"))
    assert.is_nil(fs.read(r.path):find("FEATURE_PHOTO_FIRST", 1, true))
  end)

  it("errors: a missing file, a missing backup, a bad key or value", function()
    assert.are.equal("ENOENT", raises(flags.set_env, tmp .. "/none.env", "A", 1).code)
    local err = raises(flags.restore_env, envfile("nob.env", "A=1\n"))
    assert.are.equal("flags", err.kind)
    assert.are.equal("ENOENT", err.code)
    assert.truthy(tostring(raises(flags.set_env, tmp .. "/x", "A B", 1)):find("KEY must be"))
    assert.truthy(tostring(raises(flags.set_env, tmp .. "/x", "A", {})):find("value must be"))
  end)

  it("env_step: undo puts the file back, or the keys back when it changed since", function()
    local path = envfile("step.env", SAMPLE)
    local spec = flags.env_step { path = path, values = { FEATURE_PHOTO_FIRST = "false",
      NEW_FLAG = "on" } }
    local ctx = { results = {}, step = "flags off", run_dir = tmp, log = function() end }
    local plan = spec.plan(ctx)
    assert.are.same({
      'would set FEATURE_PHOTO_FIRST in ' .. path .. ': "true" -> "false"',
      'would set NEW_FLAG in ' .. path .. ': unset -> "on"',
      "undo puts the file back as it was" }, plan)
    ctx.results[ctx.step] = spec.run(ctx)
    assert.are.equal("false", flags.get_env(path, "FEATURE_PHOTO_FIRST"))
    assert.are.equal("on", flags.get_env(path, "NEW_FLAG"))
    assert.are.equal(SAMPLE, fs.read(tmp .. "/env-flags-off.backup"))
    spec.undo(ctx)
    assert.are.equal(SAMPLE, fs.read(path))

    -- someone edits the file after the step: undo keeps their edit
    ctx.results[ctx.step] = spec.run(ctx)
    flags.set_env(path, "NODE_ENV", "staging")
    spec.undo(ctx)
    assert.are.equal("true", flags.get_env(path, "FEATURE_PHOTO_FIRST"))
    assert.is_nil(flags.get_env(path, "NEW_FLAG"))
    assert.are.equal("staging", flags.get_env(path, "NODE_ENV"))

    -- a step that fails half-way puts the file back itself
    fs.write(path, SAMPLE)
    local bad = flags.env_step { path = path, values = { A_FIRST = "1", ["bad key"] = "2" } }
    local err = raises(bad.run, ctx)
    assert.truthy(tostring(err):find("KEY must be", 1, true))
    assert.are.equal(SAMPLE, fs.read(path))
  end)
end)

describe("#pg flags in PostgreSQL", function()
  it("set returns the previous value, stamps updated_at/updated_by, inserts a new flag", function()
    local db <close> = pg.connect(db_url())
    local store = flags.pg(db, { by = "oncall" })
    assert.are.equal(true, store:get("photo_first"))
    assert.is_nil(store:get("nope"))
    local res = store:set("photo_first", false)
    assert.are.same({ name = "photo_first", value = false, previous = true, existed = true }, res)
    local row = db:query("select enabled, updated_by, updated_at > now() - interval '1 minute' "
      .. "as fresh from feature_flags where name = 'photo_first'")[1]
    assert.are.same({ enabled = false, updated_by = "oncall", fresh = true }, row)
    res = store:set("kill_switch", true)
    assert.is_false(res.existed)
    assert.are.equal(true, store:get("kill_switch"))
    assert.is_true(store:delete("kill_switch"))
    local err = raises(store.set, store, "other", true, { create = false })
    assert.are.equal("ENOFLAG", err.code)
    store:set("photo_first", true)
  end)

  it("a second attempt of a pg_step keeps the first attempt's previous value", function()
    local db <close> = pg.connect(db_url())
    local run_dir = fs.tmpdir(tmp .. "/run-")
    local spec = flags.pg_step { db = db_url(), name = "dark_mode", value = false }
    local ctx = { results = {}, step = "dark off", run_dir = run_dir, log = function() end }
    spec.run(ctx)                                  -- the first attempt, then a crash
    ctx.results[ctx.step] = spec.run(ctx)
    assert.are.equal(true, ctx.results[ctx.step].previous)
    spec.undo(ctx)
    assert.are.equal(true, flags.pg(db):get("dark_mode"))
  end)

  it("any table and columns: a jsonb value in a schema-qualified table", function()
    local db <close> = pg.connect(db_url())
    local store = flags.pg(db, { table = "app.settings", key = "key", value = "value" })
    local res = store:set("limits", { rps = 1 })
    assert.are.same({ rps = 10 }, res.previous)
    assert.are.same({ rps = 1 }, store:get("limits"))
    local err = raises(flags.pg(db, { table = "missing_table" }).get,
      flags.pg(db, { table = "missing_table" }), "x")
    assert.are.equal("ENOTABLE", err.code)
    err = raises(flags.pg(db, { value = "on" }).get, flags.pg(db, { value = "on" }), "x")
    assert.are.equal("ENOCOLUMN", err.code)
  end)
end)

describe("#redis flags in Redis", function()
  it("a string key keeps its TTL; a hash field; a field of a JSON document", function()
    local r <close> = redis.connect(REDIS_URL)
    r:set(P .. "flag", "on", "EX", 3600)
    local res = flags.redis_set(r, P .. "flag", "off")
    assert.are.equal("on", res.previous)
    assert.are.equal("off", r:get(P .. "flag"))
    assert.is_true(r:ttl(P .. "flag") > 3500)

    r:hset(P .. "h", "photo_first", "1")
    res = flags.redis_set(r, { key = P .. "h", field = "photo_first" }, 0)
    assert.are.equal("1", res.previous)
    assert.are.equal("0", r:hget(P .. "h", "photo_first"))
    assert.are.equal("0", flags.redis_get(r, { key = P .. "h", field = "photo_first" }))

    r:set(P .. "cache:flags", '{"photo_first":true,"message_attachments":true}', "EX", 86400)
    res = flags.redis_set(r, { key = P .. "cache:flags", json = "photo_first" }, false)
    assert.are.equal(true, res.previous)
    assert.are.equal(false, flags.redis_get(r, { key = P .. "cache:flags", json = "photo_first" }))
    assert.are.equal(true, flags.redis_get(r, { key = P .. "cache:flags", json = "message_attachments" }))
    assert.is_true(r:ttl(P .. "cache:flags") > 86000)
    r:set(P .. "notjson", "xyz")
    local err = raises(flags.redis_set, r, { key = P .. "notjson", json = "a" }, 1)
    assert.truthy(tostring(err):find("does not hold a JSON object", 1, true))
  end)
end)

---------------------------------------------------------------------------

describe("#pg #redis flag steps in a playbook", function()
  it("a failure later sets every flag back where it was", function()
    local r <close> = redis.connect(REDIS_URL)
    r:set(P .. "pb:flags", '{"photo_first":true}')
    local env = envfile("pb.env", "FEATURE_PHOTO_FIRST=true\nPORT=3000\n")
    local book = tmp .. "/flags-book.lua"
    fs.write(book, [[
local rbe = require "rbe"
local pb = require "rbe.playbook"
local flags = require "flags"
return pb.playbook "flags spec" {
  pb.step "env flag off" (flags.env_step { path = rbe.env "FSPEC_ENV",
    key = "FEATURE_PHOTO_FIRST", value = "false" }),
  pb.step "db flag off" (flags.pg_step { db = rbe.env "FSPEC_DB", name = "photo_first",
    value = false }),
  pb.step "db new flag" (flags.pg_step { db = rbe.env "FSPEC_DB", name = "rollback_mode",
    value = true }),
  pb.step "redis flag off" (flags.redis_step { redis = rbe.env "FSPEC_REDIS",
    key = rbe.env "FSPEC_KEY", json = "photo_first", value = false }),
  pb.step "break" { run = function() error("later step failed") end },
}
]])
    local envv = { FSPEC_ENV = env, FSPEC_DB = db_url(), FSPEC_REDIS = REDIS_URL,
      FSPEC_KEY = P .. "pb:flags" }
    local plan = proc.run({ RBE, "plan", book }, { check = false, env = envv })
    assert.are.equal(0, plan.code, plan.stderr)
    assert.truthy(plan.stdout:find('would set FEATURE_PHOTO_FIRST in ' .. env
      .. ': "true" -> "false"', 1, true), plan.stdout)
    assert.truthy(plan.stdout:find('would set feature_flags.photo_first: "true" -> "false"', 1, true))
    assert.truthy(plan.stdout:find('feature_flags.rollback_mode: no row -> "true"', 1, true))
    assert.truthy(plan.stdout:find(P .. 'pb:flags.photo_first: "true" -> "false"', 1, true))

    local res = proc.run({ RBE, "run", book, "--state-dir", tmp .. "/state", "--yes" },
      { check = false, env = envv, timeout = "60s" })
    assert.are.equal(1, res.code, res.stdout .. res.stderr)
    assert.are.equal("FEATURE_PHOTO_FIRST=true\nPORT=3000\n", fs.read(env))
    local db <close> = pg.connect(db_url())
    assert.are.equal(true, flags.pg(db):get("photo_first"))
    assert.is_nil(flags.pg(db):get("rollback_mode"))
    assert.are.equal(true, flags.redis_get(r, { key = P .. "pb:flags", json = "photo_first" }))
  end)
end)
