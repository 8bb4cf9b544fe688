-- modules/migrate.lua against the fixture's PostgreSQL, in databases of
-- this spec's own (dropped at the end): the drill's real golang-migrate
-- directory up and down, the tracking table exactly as golang-migrate
-- keeps it, failures that leave the table consistent and name the file
-- and statement, dirty tables, golang-migrate's advisory lock, verify
-- files, files that cannot run in a transaction, sqitch's and flyway's
-- registries, and the steps in a real playbook (plan and undo).
local rbe = require "rbe"
local pg = require "rbe.pg"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local migrate = require "migrate"

local PG_URL = rbe.env("RBE_TEST_PG_URL")
local ADMIN_URL = rbe.env("RBE_TEST_PG_ADMIN_URL")
local STAMP = tostring(rbe.now()):gsub("%D", ""):sub(-8)
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local ROOT = HERE .. "/../.."
local DRILL = ROOT .. "/drill/migrations"
local RBE = os.getenv("RBE_BIN") or (ROOT .. "/build/bin/rbe")
local V1, V2 = 20240129120000, 20240610093000

local function raises(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return err
end

local dbs, tmp = {}, nil
local function new_db()
  local name = ("rbe_migrate_spec_%s_%d"):format(STAMP, #dbs + 1)
  local admin <close> = pg.connect(ADMIN_URL)
  admin:exec("create database " .. name .. " owner rbe")
  dbs[#dbs + 1] = name
  return (PG_URL:gsub("/[^/?]*$", "/" .. name)), name
end

setup(function() tmp = fs.tmpdir("rbe-migrate-spec-") end)

teardown(function()
  local admin <close> = pg.connect(ADMIN_URL)
  for _, name in ipairs(dbs) do
    admin:exec("drop database if exists " .. name .. " with (force)")
  end
  if tmp then fs.remove(tmp, { recursive = true }) end
end)

-- a migrations directory from {name = sql}
local function dir_of(files)
  local d = fs.tmpdir(tmp .. "/m-")
  for name, sql in pairs(files) do fs.write(d .. "/" .. name, sql) end
  return d
end

local function tracking(db)
  local rows = db:query("select version, dirty from schema_migrations")
  assert.is_true(#rows <= 1, "golang-migrate keeps one row")
  return rows[1] and rows[1].version, rows[1] and rows[1].dirty
end

local function has_column(db, tbl, col)
  return #db:query("select 1 from information_schema.columns where table_name = $1 "
    .. "and column_name = $2", tbl, col) > 0
end

---------------------------------------------------------------------------

describe("#pg migrate with the drill's migrations", function()
  it("reads the directory the way golang-migrate names files", function()
    local list = migrate.read_dir(DRILL)
    assert.are.equal(9, #list)
    assert.are.equal(20240108090000, list[1].version)
    assert.are.equal("create_organizations", list[1].title)
    assert.are.equal(V2, list[9].version)
    assert.truthy(list[9].down:find("20240610093000_add_photo_guard_trigger.down.sql", 1, true))
  end)

  it("up to v2, down to v1 newest first, up again: the table as golang-migrate keeps it", function()
    local url = new_db()
    local db <close> = pg.connect(url)
    local st = migrate.status(db, DRILL)
    assert.is_false(st.exists)
    assert.are.equal(9, st.pending)

    local res = migrate.up(db, DRILL)
    assert.are.same({ "up", nil, V2 }, { res.direction, res.from, res.to })
    assert.are.equal(9, #res.applied)
    assert.are.same({ V2, false }, { tracking(db) })
    assert.is_true(has_column(db, "work_orders", "photo_url"))

    local plan = migrate.plan(db, DRILL, { to = V1 })
    assert.are.same({ 20240610093000, 20240610092000, 20240610091000, 20240610090000 },
      plan.versions)
    assert.truthy(plan.files[1]:find("add_photo_guard_trigger.down.sql", 1, true))

    res = migrate.down(db, DRILL, { to = V1 })
    assert.are.same({ "down", V2, V1 }, { res.direction, res.from, res.to })
    local order = {}
    for i, a in ipairs(res.applied) do order[i] = a.version end
    assert.are.same(plan.versions, order)
    assert.are.same({ V1, false }, { tracking(db) })
    assert.is_false(has_column(db, "work_orders", "photo_url"))
    assert.are.equal(0, #db:query("select 1 from pg_class where relname = 'message_attachments'"))
    assert.are.equal(1, #db:query("select 1 from pg_class where relname = 'data_archive'"))

    st = migrate.status(db, DRILL)
    assert.are.same({ V1, 5, 4 }, { st.version, st.applied, st.pending })
    assert.are.equal("create_ops_tables", st.current.title)

    res = migrate.down(db, DRILL, { steps = 2 })
    assert.are.equal(20240115100000, res.to)
    res = migrate.up(db, DRILL, { steps = 1 })
    assert.are.equal(20240122110000, res.to)
    migrate.up(db, DRILL, { to = V2 })
    assert.are.same({ V2, false }, { tracking(db) })
    assert.are.equal(0, #migrate.down(db, DRILL, { to = V2 }).applied)
    migrate.down(db, DRILL, { to = 0 })
    assert.is_nil((tracking(db)))
    assert.are.equal(0, #db:query("select 1 from pg_class where relname = 'organizations'"))
  end)

  it("refuses what golang-migrate refuses: a dirty table, an unknown version", function()
    local url = new_db()
    local db <close> = pg.connect(url)
    migrate.up(db, DRILL, { to = V1 })
    db:exec("update schema_migrations set dirty = true")
    local err = raises(migrate.down, db, DRILL, { steps = 1 })
    assert.are.equal("migrate", err.kind)
    assert.are.equal("EDIRTY", err.code)
    assert.truthy(err.message:find("version 20240129120000 is dirty", 1, true), err.message)
    migrate.force(db, V1)
    assert.are.same({ V1, false }, { tracking(db) })
    db:exec("update schema_migrations set version = 20990101000000")
    err = raises(migrate.down, db, DRILL, { steps = 1 })
    assert.are.equal("ENOVERSION", err.code)
    migrate.force(db, V1)
    assert.are.equal("ENOVERSION", raises(migrate.down, db, DRILL, { to = 123 }).code)
    assert.are.equal("ERANGE", raises(migrate.down, db, DRILL, { steps = 9 }).code)
    assert.are.equal("ERANGE", raises(migrate.down, db, DRILL, { to = V2 }).code)
    assert.truthy(tostring(raises(migrate.down, db, DRILL, {})):find("to %(a version"))
    assert.truthy(tostring(raises(migrate.down, db, DRILL, { step = 1 })):find("unknown option 'step'"))
  end)
end)

describe("#pg migrate failures", function()
  local FILES = {
    ["1_a.up.sql"] = "create table a (id int);",
    ["1_a.down.sql"] = "drop table a;",
    ["2_b.up.sql"] = "create table b (id int); insert into b values (1);",
    ["2_b.down.sql"] = "drop table b;\nselect 1/0;\n",
    ["3_c.up.sql"] = "create table c (id int);",
    ["3_c.down.sql"] = "drop table c;",
  }

  it("a failing down file is rolled back with its row; the error names it", function()
    local url = new_db()
    local db <close> = pg.connect(url)
    local dir = dir_of(FILES)
    migrate.up(db, dir)
    local err = raises(migrate.down, db, dir, { to = 0 })
    assert.are.equal("migrate", err.kind)
    assert.are.equal("22012", err.code)
    assert.are.equal(2, err.version)
    assert.are.equal(2, err.statement)
    assert.truthy(err.message:find("down 2_b failed at statement 2 of 2_b.down.sql", 1, true), err.message)
    assert.truthy(err.message:find("division by zero", 1, true))
    assert.truthy(err.message:find("still at version 2, clean", 1, true), err.message)
    assert.truthy(err.message:find("reverted in this run before it: 3", 1, true), err.message)
    assert.are.same({ 2, false }, { tracking(db) })
    assert.are.equal(1, #db:query("select * from b"))           -- drop table b rolled back
    assert.are.equal(0, #db:query("select 1 from pg_class where relname = 'c'"))
  end)

  it("a down_step that fails half-way runs the up files of what it reverted", function()
    local url = new_db()
    local db <close> = pg.connect(url)
    local dir = dir_of(FILES)
    migrate.up(db, dir)
    local spec = migrate.down_step { db = url, dir = dir, to = 0 }
    local ctx = { results = {}, step = "down", log = function() end }
    local err = raises(spec.run, ctx)
    assert.are.equal(2, err.version)
    assert.truthy(err.message:find("the step then ran 1 up file(s) to put the database back "
      .. "at version 3", 1, true), err.message)
    assert.are.same({ 3, false }, { tracking(db) })
    assert.are.equal(1, #db:query("select 1 from pg_class where relname = 'c'"))
  end)

  it("a second attempt of a down_step aims at the same version and undoes to the start", function()
    local url = new_db()
    local db <close> = pg.connect(url)
    local dir = dir_of(FILES)
    migrate.up(db, dir)
    local run_dir = fs.tmpdir(tmp .. "/run-")
    local spec = migrate.down_step { db = url, dir = dir, steps = 1 }
    local ctx = { results = {}, step = "down one", run_dir = run_dir, log = function() end }
    spec.run(ctx)                                  -- the first attempt, then a crash
    ctx.results[ctx.step] = spec.run(ctx)          -- steps = 1 must not revert one more
    assert.are.same({ 2, false }, { tracking(db) })
    assert.are.same({ direction = "down", from = "3", to = "2", versions = {} },
      ctx.results[ctx.step])
    spec.undo(ctx)
    assert.are.same({ 3, false }, { tracking(db) })
  end)

  it("a missing down file stops the run before anything is reverted", function()
    local url = new_db()
    local db <close> = pg.connect(url)
    local files = {}
    for k, v in pairs(FILES) do files[k] = v end
    files["2_b.down.sql"] = nil
    local dir = dir_of(files)
    migrate.up(db, dir)
    local err = raises(migrate.down, db, dir, { to = 1 })
    assert.are.equal("ENODOWN", err.code)
    assert.are.same({ 3, false }, { tracking(db) })
    assert.are.equal(1, #db:query("select 1 from pg_class where relname = 'c'"))
  end)

  it("verify files run in the step's transaction; a failing one rolls it back", function()
    local url = new_db()
    local db <close> = pg.connect(url)
    local files = {}
    for k, v in pairs(FILES) do files[k] = v end
    files["2_b.verify.sql"] = "select 1/count(*) from pg_class where relname = 'c';"
    local dir = dir_of(files)
    -- up to 2: verify 2 runs while c does not exist yet -> rolled back
    local err = raises(migrate.up, db, dir)
    assert.are.equal(2, err.version)
    assert.truthy(err.message:find("verify file 2_b.verify.sql", 1, true), err.message)
    assert.are.same({ 1, false }, { tracking(db) })
    assert.are.equal(0, #db:query("select 1 from pg_class where relname = 'b'"))
    fs.write(dir .. "/2_b.verify.sql", "select id from b where false;")
    migrate.up(db, dir)
    assert.are.same({ 3, false }, { tracking(db) })
    -- down from 3 lands on 2: 2's verify checks b is still there
    fs.write(dir .. "/3_c.down.sql", "drop table c; drop table b;")
    err = raises(migrate.down, db, dir, { steps = 1 })
    assert.truthy(err.message:find("verify file 2_b.verify.sql", 1, true), err.message)
    assert.are.same({ 3, false }, { tracking(db) })
  end)

  it("a file that cannot run in a transaction runs golang-migrate's way", function()
    local url = new_db()
    local db <close> = pg.connect(url)
    local dir = dir_of {
      ["1_t.up.sql"] = "create table t (id int, x text);",
      ["1_t.down.sql"] = "drop table t;",
      ["2_idx.up.sql"] = "create index concurrently t_x_idx on t (x);",
      ["2_idx.down.sql"] = "drop index concurrently t_x_idx;",
      ["3_bad.up.sql"] = "-- rbe:no-transaction\nselect 1; select nope;",
      ["3_bad.down.sql"] = "select 1;",
    }
    local err = raises(migrate.up, db, dir)
    assert.are.equal(3, err.version)
    assert.is_true(err.dirty)
    assert.truthy(err.message:find("left at version 3, DIRTY", 1, true), err.message)
    assert.are.same({ 3, true }, { tracking(db) })
    assert.are.equal(1, #db:query("select 1 from pg_class where relname = 't_x_idx'"))
    migrate.force(db, 2)
    local res = migrate.down(db, dir, { steps = 1 })
    assert.is_true(res.applied[1].no_transaction)
    assert.are.same({ 1, false }, { tracking(db) })
  end)

  it("tells which statements need to run outside a transaction", function()
    local no_tx = migrate._needs_no_tx
    assert.is_true((no_tx("create index concurrently i on t (x)")))
    assert.is_true((no_tx("BEGIN; create table x (); COMMIT;")))
    assert.is_false((no_tx([[create function f() returns trigger language plpgsql as $$
      BEGIN COMMIT; END $$; create table y ();]])))
    assert.is_false((no_tx("create function g() returns int language sql begin atomic "
      .. "select 1; select case when true then 1 end; end; select 'BEGIN;' /* COMMIT; */ -- VACUUM;\n")))
    assert.is_false((no_tx("select E'it\\'s; VACUUM'")))
    assert.is_true((no_tx("vacuum analyze t")))
    assert.are.same({ "CREATE TABLE A X", "INSERT INTO A VALUES" },
      migrate._statement_heads("create table a (x int); insert into a values (';')"))
  end)
end)

describe("#pg migrate lock and registries", function()
  it("uses golang-migrate's advisory lock id and says who holds it", function()
    -- crc32("public\0schema_migrations\0rbe_test") * 1486364155 mod 2^32,
    -- computed independently (Python's zlib)
    assert.are.equal(1779006344, migrate.lock_id("rbe_test"))
    assert.are.equal(2229726422, migrate.lock_id("drill", "public", "schema_migrations"))
    local url, name = new_db()
    local db <close> = pg.connect(url)
    local other <close> = pg.connect(url, { application_name = "migrate-cli" })
    local dir = dir_of { ["1_a.up.sql"] = "create table a (id int);",
                         ["1_a.down.sql"] = "drop table a;" }
    other:query("select pg_advisory_lock($1)", migrate.lock_id(name))
    local err = raises(migrate.up, db, dir, { lock_timeout = "300ms" })
    assert.are.equal("ELOCKED", err.code)
    assert.is_true(err.retryable)
    assert.truthy(err.message:find('application "migrate-cli"', 1, true), err.message)
    assert.are.equal(other:info().backend_pid, err.holder)
    other:query("select pg_advisory_unlock($1)", migrate.lock_id(name))
    migrate.up(db, dir, { lock_timeout = "2s" })
    -- the lock is released after the run
    assert.is_true(other:query("select pg_try_advisory_lock($1) as ok", migrate.lock_id(name))[1].ok)
  end)

  it("reports sqitch's and flyway's applied state", function()
    local url = new_db()
    local db <close> = pg.connect(url)
    db:exec([[
      create schema sqitch;
      create table sqitch.changes (change_id text primary key, script_hash text,
        change text not null, project text not null, note text not null default '',
        committed_at timestamptz not null, committer_name text not null,
        committer_email text not null, planned_at timestamptz not null,
        planner_name text not null, planner_email text not null);
      insert into sqitch.changes values
        ('a1', null, 'users', 'app', '', '2024-01-01', 'x', 'x@y', now(), 'x', 'x@y'),
        ('a2', null, 'photos', 'app', '', '2024-06-10', 'x', 'x@y', now(), 'x', 'x@y');
      create table flyway_schema_history (installed_rank int primary key, version text,
        description text not null, type text not null, script text not null,
        checksum int, installed_by text not null, installed_on timestamp not null default now(),
        execution_time int not null, success boolean not null);
      insert into flyway_schema_history values
        (1, '1', 'init', 'SQL', 'V1__init.sql', 1, 'x', now(), 5, true),
        (2, '1.1', 'photos', 'SQL', 'V1_1__photos.sql', 1, 'x', now(), 5, true),
        (3, '1.2', 'broken', 'SQL', 'V1_2__broken.sql', 1, 'x', now(), 5, false)]])
    local reg = migrate.registry(db)
    assert.is_nil(reg.golang_migrate)
    assert.are.same({ { project = "app", change = "photos", changes = 2,
      committed_at = reg.sqitch.projects[1].committed_at } }, reg.sqitch.projects)
    assert.truthy(reg.sqitch.projects[1].committed_at:find("^2024%-06%-10"))
    assert.are.same({ "1.1", "photos", 2 }, { reg.flyway.version, reg.flyway.description,
      reg.flyway.applied })
    assert.are.same({ { version = "1.2", description = "broken", script = "V1_2__broken.sql" } },
      reg.flyway.failed)
    local st = migrate.status(db, DRILL)
    assert.are.equal("1.1", st.others.flyway.version)
    db:exec("create table schema_migrations (version varchar primary key)")
    local err = raises(migrate.status, db, DRILL)
    assert.truthy(err.message:find("is not golang-migrate's table", 1, true))
  end)
end)

---------------------------------------------------------------------------

describe("#pg migrate steps in a playbook", function()
  it("plan lists the down files in order; a later failure runs the up files back", function()
    local url = new_db()
    local db <close> = pg.connect(url)
    migrate.up(db, DRILL)
    local book = tmp .. "/migrate-book.lua"
    fs.write(book, [[
local rbe = require "rbe"
local pb = require "rbe.playbook"
local migrate = require "migrate"
return pb.playbook "migrate spec" {
  pb.step "schema to v1" (migrate.down_step { db = rbe.env "MSPEC_DB",
    dir = rbe.env "MSPEC_DIR", to = tonumber(rbe.env "MSPEC_TO") }),
  pb.step "break" { run = function() error("later step failed") end },
}
]])
    local env = { MSPEC_DB = url, MSPEC_DIR = DRILL, MSPEC_TO = tostring(V1) }
    local plan = proc.run({ RBE, "plan", book }, { check = false, env = env })
    assert.are.equal(0, plan.code, plan.stderr)
    local out = plan.stdout
    local a = out:find("would run 4 down file(s), newest first", 1, true)
    local p1 = out:find("1. 20240610093000_add_photo_guard_trigger.down.sql", 1, true)
    local p2 = out:find("2. 20240610092000_add_attachment_indexes.down.sql", 1, true)
    local p3 = out:find("3. 20240610091000_create_message_attachments.down.sql", 1, true)
    local p4 = out:find("4. 20240610090000_add_work_order_photos.down.sql", 1, true)
    assert.truthy(a and p1 and p2 and p3 and p4, out)
    assert.is_true(a < p1 and p1 < p2 and p2 < p3 and p3 < p4, out)
    assert.truthy(out:find("version 20240610093000 -> 20240129120000", 1, true), out)
    assert.are.same({ V2, false }, { tracking(db) })

    local res = proc.run({ RBE, "run", book, "--state-dir", tmp .. "/state", "--yes" },
      { check = false, env = env, timeout = "60s" })
    assert.are.equal(1, res.code, res.stdout .. res.stderr)
    assert.are.same({ V2, false }, { tracking(db) })
    assert.is_true(has_column(db, "work_orders", "photo_url"))
    local journal = fs.read(tmp .. "/state/runs/" .. fs.list(tmp .. "/state/runs")[1]
      .. "/journal.jsonl")
    assert.truthy(journal:find('"to":"20240129120000"', 1, true), journal)
  end)
end)
