-- modules/backup.lua with Debian's pg_dump/pg_restore/psql against the
-- fixture's PostgreSQL, in databases of this spec's own (dropped at the
-- end): a database with data is dumped, verified, damaged (rows changed,
-- a table dropped, rows added), restored, and compared by row counts and
-- checksums.  Also: the password never reaches argv (a wrapper records
-- what the binaries got), retention, plain SQL dumps, terminating other
-- sessions, refused and damaged dumps, CSV exports, and the steps in a
-- real playbook.
local rbe = require "rbe"
local pg = require "rbe.pg"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local backup = require "backup"

local PG_URL = rbe.env("RBE_TEST_PG_URL")
local ADMIN_URL = rbe.env("RBE_TEST_PG_ADMIN_URL")
local BINDIR = rbe.env("RBE_TEST_PG_BINDIR")
local PASSWORD = PG_URL:match("^postgresql://[^:]+:([^@]+)@")
local STAMP = tostring(rbe.now()):gsub("%D", ""):sub(-8)
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local RBE = os.getenv("RBE_BIN") or (HERE .. "/../../build/bin/rbe")

local function raises(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected an error")
  return err
end

local dbs, tmp = {}, nil
local function new_db()
  local name = ("rbe_backup_spec_%s_%d"):format(STAMP, #dbs + 1)
  local admin <close> = pg.connect(ADMIN_URL)
  admin:exec("create database " .. name .. " owner rbe")
  dbs[#dbs + 1] = name
  local url = PG_URL:gsub("/[^/?]*$", "/" .. name)
  local db <close> = pg.connect(url)
  db:exec([[
    create table orgs (id serial primary key, name text not null);
    create table orders (id bigserial primary key, org int references orgs, total numeric(10,2),
      note text, created_at timestamptz default '2024-06-01');
    insert into orgs (name) select 'org ' || i from generate_series(1, 12) i;
    insert into orders (org, total, note)
      select 1 + i % 12, i * 1.25, case when i % 7 = 0 then null else 'n' || i end
        from generate_series(1, 1500) i;
    create view big_orders as select * from orders where total > 1000;]])
  return url, name
end

-- row counts and checksums of every table
local function fingerprint(url)
  local db <close> = pg.connect(url)
  local out = {}
  for _, t in ipairs { "orgs", "orders" } do
    local r = db:query(("select count(*) as n, md5(coalesce(string_agg(x::text, '|' order by id), '')) "
      .. "as sum from %s x"):format(t))[1]
    out[t] = { rows = r.n, md5 = r.sum }
  end
  out.seq = db:query("select last_value from orders_id_seq")[1].last_value
  return out
end

setup(function() tmp = fs.tmpdir("rbe-backup-spec-") end)

teardown(function()
  local admin <close> = pg.connect(ADMIN_URL)
  for _, name in ipairs(dbs) do
    admin:exec("drop database if exists " .. name .. " with (force)")
  end
  if tmp then fs.remove(tmp, { recursive = true }) end
end)

---------------------------------------------------------------------------

describe("#pg backup", function()
  it("dump, damage, restore: row counts and checksums come back", function()
    local url, name = new_db()
    local before = fingerprint(url)
    local res = backup.dump(url, { dir = tmp .. "/d1", verify = true })
    assert.truthy(res.path:match("/" .. name .. "%-%d%d%d%d%d%d%d%dT%d%d%d%d%d%d%d%d%dZ%.dump$"), res.path)
    assert.are.equal(fs.stat(res.path).size, res.bytes)
    assert.is_true(res.bytes > 1000)
    assert.is_true(res.seconds > 0)
    assert.are.equal(name, res.database)
    assert.are.equal("/usr/lib/postgresql/15/bin", res.bindir)
    assert.are.equal(name, res.toc.database)
    assert.are.equal(2, res.toc.tables)
    assert.are.equal("custom", res.toc.format)
    assert.are.same({ res.path:match("[^/]*$") }, fs.list(tmp .. "/d1"))   -- no .part left

    do
      local db <close> = pg.connect(url)
      db:exec([[update orders set total = 0 where id <= 700;
        delete from orders where id > 1400;
        insert into orders (org, total) values (1, 99);
        drop view big_orders;
        alter table orgs add column extra int]])
    end
    assert.are_not.same(before, fingerprint(url))

    -- a session of the app is open: terminate = true ends it first
    local app = pg.connect(url, { application_name = "app" })
    app:query("select 1")
    local r = backup.restore(url, res.path, { terminate = true })
    assert.are.equal(1, r.terminated)
    local ok, err = pcall(app.query, app, "select 1")
    assert.is_false(ok)
    assert.are.equal("pg", err.kind)
    app:close()
    assert.are.same(before, fingerprint(url))
    local db <close> = pg.connect(url)
    assert.are.equal(1, #db:query("select 1 from pg_views where viewname = 'big_orders'"))
  end)

  it("the password goes by PGPASSWORD, never in argv", function()
    local url = new_db()
    local bin = tmp .. "/wrapbin"
    fs.mkdir(bin)
    for _, t in ipairs { "pg_dump", "pg_restore", "psql" } do
      fs.write(bin .. "/" .. t, ([[#!/bin/sh
printf '%%s\n' "$@" >> %s/argv-%s
echo "PGPASSWORD=${PGPASSWORD:+set}" >> %s/argv-%s
exec %s/%s "$@"
]]):format(bin, t, bin, t, BINDIR, t), { mode = "0755" })
    end
    local res = backup.dump(url, { dir = tmp .. "/d2", bindir = bin })
    backup.restore(url, res.path, { bindir = bin })
    local plain = backup.dump(url, { dir = tmp .. "/d2", bindir = bin, format = "plain" })
    backup.restore(url, plain.path, { bindir = bin })
    for _, t in ipairs { "pg_dump", "pg_restore", "psql" } do
      local argv = fs.read(bin .. "/argv-" .. t)
      assert.is_nil(argv:find(PASSWORD, 1, true), t .. " got the password in argv: " .. argv)
      assert.truthy(argv:find("--no-password", 1, true), argv)
      assert.truthy(argv:find("PGPASSWORD=set", 1, true), argv)
      assert.truthy(argv:find("postgresql://rbe@127.0.0.1:", 1, true), argv)
    end
    -- a libpq key=value string works the same
    local host, port, dbname = url:match("@([^:/]+):(%d+)/(.+)$")
    local kv = ("host=%s port=%s dbname=%s user=rbe password='%s'"):format(host, port, dbname, PASSWORD)
    local res2 = backup.dump(kv, { dir = tmp .. "/d2", bindir = bin, name = "kv" })
    assert.truthy(res2.path:find("/kv-", 1, true))
    assert.is_nil(fs.read(bin .. "/argv-pg_dump"):find(PASSWORD, 1, true))
  end)

  it("keep = N prunes older dumps of the same name only", function()
    local url, name = new_db()
    local dir = tmp .. "/d3"
    fs.mkdir(dir)
    fs.write(dir .. "/other-20200101T000000000Z.dump", "x")
    fs.write(dir .. "/notes.txt", "keep me")
    local paths = {}
    for i = 1, 3 do
      paths[i] = backup.dump(url, { dir = dir, bindir = BINDIR, keep = 2 }).path
    end
    local last = backup.dump(url, { dir = dir, bindir = BINDIR, keep = 2 })
    assert.are.same({ paths[2] }, last.removed)
    local left = backup.list(dir, { name = name })
    assert.are.same({ last.path, paths[3] }, { left[1].path, left[2].path })
    assert.is_true(fs.exists(dir .. "/other-20200101T000000000Z.dump"))
    assert.is_true(fs.exists(dir .. "/notes.txt"))
    assert.are.equal(3, #backup.list(dir))
  end)

  it("plain SQL dumps verify and restore through psql", function()
    local url = new_db()
    local before = fingerprint(url)
    local res = backup.dump(url, { dir = tmp .. "/d4", bindir = BINDIR, format = "plain" })
    assert.truthy(res.path:match("%.sql$"))
    local v = backup.verify(res.path)
    assert.are.equal("plain", v.format)
    assert.truthy(v.server_version:find("^15"))
    local db <close> = pg.connect(url)
    db:exec("drop view big_orders; drop table orders; drop table orgs")
    backup.restore(url, res.path, { bindir = BINDIR })
    assert.are.same(before, fingerprint(url))
    -- a cut file is refused
    local text = fs.read(res.path)
    fs.write(tmp .. "/cut.sql", text:sub(1, #text // 2))
    assert.are.equal("EBADDUMP", raises(backup.verify, tmp .. "/cut.sql").code)
  end)

  it("a damaged dump is refused by verify, and a failed restore changes nothing", function()
    local url = new_db()
    local res = backup.dump(url, { dir = tmp .. "/d5", bindir = BINDIR })
    local data = fs.read(res.path)
    fs.write(tmp .. "/broken.dump", data:sub(1, 200))
    local err = raises(backup.verify, tmp .. "/broken.dump")
    assert.are.equal("backup", err.kind)
    assert.are.equal("EBADDUMP", err.code)
    fs.write(tmp .. "/junk.dump", "not a dump at all")
    assert.are.equal("EBADDUMP", raises(backup.verify, tmp .. "/junk.dump").code)
    assert.are.equal("ENOENT", raises(backup.verify, tmp .. "/none.dump").code)

    -- a dump that fails half-way (a conflicting row) is one transaction
    local db <close> = pg.connect(url)
    local before = fingerprint(url)
    local data_only = backup.dump(url, { dir = tmp .. "/d5", bindir = BINDIR, name = "data",
      data_only = true, tables = { "orgs" } })
    db:exec("delete from orgs where id = 12 and not exists (select 1 from orders where org = 12)")
    err = raises(backup.restore, url, data_only.path, { bindir = BINDIR, clean = false })
    assert.are.equal("backup", err.kind)
    assert.truthy(err.message:find("duplicate key", 1, true), err.message)
    assert.is_nil(err.message:find(PASSWORD, 1, true))
    assert.are.same(before, fingerprint(url))
  end)

  it("a wrong password or a missing binary is a clear error without the password", function()
    local url = new_db()
    local at = url:find(":" .. PASSWORD .. "@", 1, true)
    local bad = url:sub(1, at) .. "wrong-pw" .. url:sub(at + 1 + #PASSWORD)
    local err = raises(backup.dump, bad, { dir = tmp .. "/d6", bindir = BINDIR })
    assert.are.equal("backup", err.kind)
    assert.truthy(err.message:find("password authentication failed", 1, true), err.message)
    assert.is_nil(err.message:find("wrong-pw", 1, true))
    assert.are.same({}, fs.list(tmp .. "/d6"))      -- no partial file left
    err = raises(backup.dump, url, { dir = tmp .. "/d6", bindir = tmp .. "/nobin" })
    assert.are.equal("ENOENT", err.code)
  end)

  it("export_table saves rows as CSV; import_table loads them back", function()
    local url = new_db()
    local db <close> = pg.connect(url)
    local path = tmp .. "/recent-orders.csv"
    local r = backup.export_table(db, "public.orders", path, { where = "id > 1490" })
    assert.are.equal(10, r.rows)
    local lines = {}
    for l in fs.lines(path) do lines[#lines + 1] = l end
    assert.are.equal(11, #lines)
    assert.truthy(lines[1]:find("^id,org,total,note,created_at"))
    db:exec("delete from orders where id > 1490")
    r = backup.import_table(db, "orders", path)
    assert.are.equal(10, r.rows)
    assert.are.equal(1500, db:query("select count(*) as n from orders")[1].n)
  end)

  it("terminate_connections ends every other session of the database", function()
    local url, name = new_db()
    local a = pg.connect(url)
    local b = pg.connect(url)
    local admin <close> = pg.connect(ADMIN_URL)
    assert.are.equal(2, backup.terminate_connections(admin, name))
    assert.is_false((pcall(a.query, a, "select 1")))
    assert.is_false((pcall(b.query, b, "select 1")))
    a:close()
    b:close()
    assert.are.equal(0, backup.terminate_connections(admin, name))
  end)
end)

---------------------------------------------------------------------------

describe("#pg backup steps in a playbook", function()
  it("restore_step saves the database first; a later failure puts that state back", function()
    local url = new_db()
    local good = backup.dump(url, { dir = tmp .. "/d7", bindir = BINDIR, name = "predeploy" })
    local good_state = fingerprint(url)
    local db <close> = pg.connect(url)
    db:exec("update orders set note = 'v2 wrote this' where id % 3 = 0; insert into orgs (name) values ('new')")
    local bad_state = fingerprint(url)
    local book = tmp .. "/backup-book.lua"
    fs.write(book, [[
local rbe = require "rbe"
local pb = require "rbe.playbook"
local backup = require "backup"
return pb.playbook "backup spec" {
  pb.step "save new rows" (backup.export_step { url = rbe.env "BSPEC_DB",
    tables = { "orgs" }, where = "id > 12" }),
  pb.step "restore predeploy" (backup.restore_step { url = rbe.env "BSPEC_DB",
    dir = rbe.env "BSPEC_DIR", name = "predeploy", file = "latest", terminate = true }),
  pb.step "check" { run = function(ctx)
    if rbe.env("BSPEC_FAIL", "") == "1" then error("health check failed") end
  end },
}
]])
    local env = { BSPEC_DB = url, BSPEC_DIR = tmp .. "/d7", BSPEC_FAIL = "1" }
    local plan = proc.run({ RBE, "plan", book }, { check = false, env = env })
    assert.are.equal(0, plan.code, plan.stderr)
    assert.truthy(plan.stdout:find("would save 1 row(s) of orgs as CSV", 1, true), plan.stdout)
    assert.truthy(plan.stdout:find("would restore " .. good.path, 1, true), plan.stdout)
    assert.truthy(plan.stdout:find("undo restores that dump", 1, true))
    assert.is_nil(plan.stdout:find(PASSWORD, 1, true))

    local res = proc.run({ RBE, "run", book, "--state-dir", tmp .. "/state", "--yes" },
      { check = false, env = env, timeout = "120s" })
    assert.are.equal(1, res.code, res.stdout .. res.stderr)
    assert.are.same(bad_state, fingerprint(url))        -- undone: the state before the restore
    local run = tmp .. "/state/runs/" .. fs.list(tmp .. "/state/runs")[1]
    assert.truthy(fs.read(run .. "/orgs.csv"):find("new", 1, true))
    assert.are.equal(1, #backup.list(run, { name = "before-restore" }))
    assert.is_nil(fs.read(run .. "/journal.jsonl"):find(PASSWORD, 1, true))

    env.BSPEC_FAIL = "0"
    res = proc.run({ RBE, "run", book, "--state-dir", tmp .. "/state2", "--yes" },
      { check = false, env = env, timeout = "120s" })
    assert.are.equal(0, res.code, res.stdout .. res.stderr)
    assert.are.same(good_state, fingerprint(url))
  end)
end)
