-- rbe.pg against the throwaway PostgreSQL of tests/fixtures: connecting,
-- every type both ways, errors, scripts, transactions, pipelines, COPY,
-- LISTEN/NOTIFY, timeouts and cancellation, pools, a killed backend, and a
-- private server that is restarted and frozen mid-run.  The spec works in
-- a database of its own, dropped at the end.
local rbe = require "rbe"
local pg = require "rbe.pg"
local proc = require "rbe.proc"
local fs = require "rbe.fs"

local URL = rbe.env("RBE_TEST_PG_URL")
local ADMIN_URL = rbe.env("RBE_TEST_PG_ADMIN_URL")
local PASSWORD = URL:match("^postgresql://[^:]+:([^@]+)@")
local DBNAME = "rbe_pg_spec_" .. tostring(rbe.now()):gsub("%D", ""):sub(-9)
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local SERVERS = HERE .. "/../fixtures/servers.sh"

local function connect(opts)
  local o = { dbname = DBNAME }
  for k, v in pairs(opts or {}) do o[k] = v end
  return pg.connect(URL, o)
end

local raises = require("support").raises

local function wait_until(f, secs, what)
  local deadline = rbe.now() + (secs or 10)
  while rbe.now() < deadline do
    if f() then return true end
    rbe.sleep(0.02)
  end
  error("timed out waiting for " .. (what or "a condition"))
end

-- backends of this spec's database running a statement that matches pat
local function running(admin, pat)
  return admin:query("select pid from pg_stat_activity where datname = $1 "
    .. "and state = 'active' and query like $2 and pid <> pg_backend_pid()",
    DBNAME, pat)
end

local function tmpname()
  local p = os.tmpname()
  os.remove(p)
  return p
end

-- the C structs of rbe.pg come back to zero too
local function settled()
  collectgarbage()
  collectgarbage()
  local s = pg._core._stats()
  return s.conns == 0 and s.ops == 0
end

setup(function()
  local admin <close> = pg.connect(ADMIN_URL)
  admin:exec("create database " .. DBNAME .. " owner rbe")
end)

teardown(function()
  local admin <close> = pg.connect(ADMIN_URL)
  admin:exec("drop database if exists " .. DBNAME .. " with (force)")
end)

after_each(function()
  wait_until(settled, 10, "rbe.pg's connections and requests to be freed")
end)

describe("#pg connect", function()
  it("connects with a URL, a table and options; application_name defaults to rbe", function()
    local db <close> = connect()
    assert.are.equal("ready", db:status())
    local info = db:info()
    assert.are.equal(DBNAME, info.dbname)
    assert.are.equal("rbe", info.user)
    assert.are.equal("rbe", info.application_name)
    assert.is_true(info.server_version >= 100000)
    assert.are.equal(info.backend_pid, db:query("select pg_backend_pid() as p")[1].p)
    local port = rbe.env("RBE_TEST_PG_PORT")
    local db2 <close> = pg.connect({ host = "127.0.0.1", port = port, user = "rbe",
      password = PASSWORD, dbname = DBNAME, application_name = "spec-app" })
    assert.are.equal("spec-app", db2:query("select current_setting('application_name') as a")[1].a)
    -- key=value strings, and a secret as the URL
    local db3 <close> = pg.connect(("host=127.0.0.1 port=%s user=rbe password=%s dbname=%s")
      :format(port, PASSWORD, DBNAME))
    assert.are.equal(1, db3:query("select 1 as x")[1].x)
    local db4 <close> = pg.connect(rbe.secret(URL), { dbname = DBNAME })
    assert.are.equal(DBNAME, db4:info().dbname)
  end)

  it("resolves host names off the loop and connects over a unix socket", function()
    local port = rbe.env("RBE_TEST_PG_PORT")
    local db <close> = pg.connect(("postgresql://rbe:%s@localhost:%s/%s"):format(PASSWORD, port, DBNAME))
    assert.are.equal("127.0.0.1", db:query("select host(inet_client_addr()) as a")[1].a)
    assert.truthy(tostring(db):find("rbe:***@localhost:" .. port, 1, true), tostring(db))
    local sock <close> = pg.connect({ host = rbe.env("RBE_TEST_PG_SOCKET_DIR"), port = port,
      user = "postgres", dbname = DBNAME })
    assert.are.equal(rbe.null, sock:query("select inet_client_addr() as a")[1].a)
    assert.truthy(tostring(sock):find("postgres@[", 1, true), tostring(sock))
    -- a connect cancelled while the name resolves leaves nothing behind
    local t = rbe.spawn(pg.connect, "postgresql://rbe@localhost:" .. port .. "/x")
    rbe.sleep(0)
    t:cancel()
    assert.is_false(pcall(t.join, t))
  end)

  it("takes the password from PGPASSWORD", function()
    local port = rbe.env("RBE_TEST_PG_PORT")
    rbe.setenv("PGPASSWORD", PASSWORD)
    local ok, db = pcall(pg.connect, "postgresql://rbe@127.0.0.1:" .. port .. "/" .. DBNAME)
    rbe.setenv("PGPASSWORD", nil)
    assert.is_true(ok, tostring(db))
    assert.truthy(tostring(db):find("rbe:***@", 1, true))
    db:close()
  end)

  it("never shows the password: tostring, info, errors", function()
    local db <close> = connect()
    assert.is_nil(tostring(db):find(PASSWORD, 1, true))
    assert.truthy(tostring(db):find("postgresql://rbe:***@127.0.0.1:", 1, true))
    for _, v in pairs(db:info()) do
      assert.is_nil(tostring(v):find(PASSWORD, 1, true))
    end
  end)

  it("a wrong password fails with 28P01 and the error does not contain it", function()
    local bad = "Wr0ng-Secret-Pass"
    local url = URL:gsub(":[^:@/]+@", ":" .. bad .. "@")
    local err = raises(pg.connect, url)
    assert.are.equal("pg", err.kind)
    assert.are.equal("28P01", err.code)
    assert.is_false(err.retryable)
    local s = tostring(err)
    assert.truthy(s:find("password authentication failed", 1, true), s)
    assert.is_nil(s:find(bad, 1, true), s)
    assert.truthy(s:find("rbe:***@", 1, true), s)
    -- the same through a table of parameters
    err = raises(pg.connect, { host = "127.0.0.1", port = rbe.env("RBE_TEST_PG_PORT"),
      user = "rbe", password = bad, dbname = "rbe_test" })
    assert.are.equal("28P01", err.code)
    assert.is_nil(tostring(err):find(bad, 1, true))
  end)

  it("a bad URL or option gives a clear error without the password", function()
    local err = raises(pg.connect, "postgresql://rbe:Hunter2-Secret@127.0.0.1:notaport/db")
    local s = tostring(err)
    assert.truthy(s:find("pg.connect", 1, true), s)
    assert.truthy(s:find("port", 1, true), s)
    assert.is_nil(s:find("Hunter2-Secret", 1, true), s)
    err = raises(pg.connect, "postgresql://rbe:Hunter2%zzSecret@127.0.0.1/db")
    assert.is_nil(tostring(err):find("Hunter2", 1, true), tostring(err))
    err = raises(pg.connect, "mysql-ish nonsense")
    assert.truthy(tostring(err):find("postgresql:// URL", 1, true), tostring(err))
    err = raises(pg.connect, URL, { sslmod = "disable" })
    assert.truthy(tostring(err):find("unknown option 'sslmod'", 1, true), tostring(err))
    err = raises(pg.connect, URL, { connect_timeout = "soon" })
    assert.truthy(tostring(err):find("connect_timeout", 1, true), tostring(err))
    err = raises(pg.connect, 42)
    assert.truthy(tostring(err):find("URL or table", 1, true), tostring(err))
  end)

  it("a refused connection is a retryable pg error; a missing database is not", function()
    local err = raises(pg.connect, "postgresql://rbe:x@127.0.0.1:1/db")
    assert.are.equal("pg", err.kind)
    assert.are.equal("08001", err.code)
    assert.is_true(err.retryable)
    err = raises(pg.connect, URL, { dbname = "no_such_db_here" })
    assert.are.equal("3D000", err.code)
    assert.is_false(err.retryable)
  end)

  it("closing twice is fine and a closed handle says so", function()
    local db = connect()
    db:close()
    db:close()
    assert.are.equal("closed", db:status())
    local err = raises(db.query, db, "select 1")
    assert.truthy(tostring(err):find("db:query: the connection is closed", 1, true))
  end)

  it("must run inside a task, not across a C boundary", function()
    local err = raises(function()
      local t = { 2, 1 }
      table.sort(t, function(a, b) pg.connect(URL) return a < b end)
    end)
    assert.truthy(tostring(err):find("cannot wait here", 1, true), tostring(err))
  end)
end)

describe("#pg types", function()
  it("round-trips integers, floats, numeric, booleans and text", function()
    local db <close> = connect()
    local r = db:query([[select $1::int2 as i2, $2::int4 as i4, $3::int8 as i8max,
      $4::int8 as i8min, $5::oid as o, $6::float8 as f8, $7::float4 as f4,
      $8::numeric as n, $9::bool as t, $10::bool as f, $11::text as s,
      $12::varchar as v, $13::float8 as inf, $14::float8 as third]],
      -32768, 2147483647, math.maxinteger, math.mininteger, 4294967295, 0.1, 1.5,
      "12345678901234567890.123456789012345678901", true, false, "héllo ☃ 'q' \"d\" \\",
      "", math.huge, 1 / 3)[1]
    assert.are.equal(-32768, r.i2)
    assert.are.equal(2147483647, r.i4)
    assert.are.equal(math.maxinteger, r.i8max)
    assert.are.equal(math.mininteger, r.i8min)
    assert.are.equal("integer", math.type(r.i8min))
    assert.are.equal(4294967295, r.o)
    assert.are.equal(0.1, r.f8)
    assert.are.equal(1.5, r.f4)
    assert.are.equal("12345678901234567890.123456789012345678901", r.n)
    assert.are.equal(true, r.t)
    assert.are.equal(false, r.f)
    assert.are.equal("héllo ☃ 'q' \"d\" \\", r.s)
    assert.are.equal("", r.v)
    assert.are.equal(math.huge, r.inf)
    assert.are.equal(1 / 3, r.third)
    local nan = db:query("select 'NaN'::float8 as x")[1].x
    assert.is_true(nan ~= nan)
    -- numeric keeps every digit, also from arithmetic
    assert.are.equal("0.30000000000000000000", db:query(
      "select (0.1::numeric(30,20) + 0.2::numeric(30,20)) as x")[1].x)
  end)

  it("uuids, timestamps, dates and intervals come back as strings", function()
    local db <close> = connect()
    db:exec("set timezone = 'UTC'")
    local r = db:query([[select $1::uuid as u, $2::timestamptz as tz, $3::timestamp as ts,
      $4::date as d, '1 day 02:03:04'::interval as iv]],
      "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "2024-02-29 12:34:56.789+00",
      "2024-01-01 00:00:00", "1999-12-31")[1]
    assert.are.equal("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", r.u)
    assert.are.equal("2024-02-29 12:34:56.789+00", r.tz)
    assert.are.equal("2024-01-01 00:00:00", r.ts)
    assert.are.equal("1999-12-31", r.d)
    assert.are.equal("1 day 02:03:04", r.iv)
  end)

  it("NULL: nil and rbe.null go in, rbe.null comes out", function()
    local db <close> = connect()
    local r = db:query("select $1::int as a, $2::text as b, $3::int as c, null as d",
      nil, rbe.null, 7)[1]
    assert.are.equal(rbe.null, r.a)
    assert.are.equal(rbe.null, r.b)
    assert.are.equal(7, r.c)
    assert.are.equal(rbe.null, r.d)
    assert.are.equal(pg.null, rbe.null)
    -- trailing nils count as parameters
    assert.are.equal(rbe.null, db:query("select $1::int as x", nil)[1].x)
  end)

  it("bytea: any bytes, zero bytes included, both ways", function()
    local db <close> = connect()
    db:exec("create table blobs (id int primary key, b bytea)")
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    local bin = table.concat(all) .. "\0\0end\\x41"
    db:query("insert into blobs values (1, $1)", pg.bytea(bin))
    db:query("insert into blobs values (2, $1)", "a\0b\xff") -- not UTF-8: sent as binary
    db:query("insert into blobs values (3, $1)", pg.bytea(""))
    local rows = db:query("select id, b, length(b) as n from blobs order by id")
    assert.are.equal(bin, rows[1].b)
    assert.are.equal(#bin, rows[1].n)
    assert.are.equal("a\0b\xff", rows[2].b)
    assert.are.equal(4, rows[2].n)
    assert.are.equal("", rows[3].b)
    -- the old escape output format too
    db:exec("set bytea_output = 'escape'")
    assert.are.equal(bin, db:query("select b from blobs where id = 1")[1].b)
    db:exec("drop table blobs")
  end)

  it("json and jsonb: tables go in, decoded values come out", function()
    local db <close> = connect()
    local doc = { name = "rollback", steps = { 1, 2, 3 }, nested = { ok = true, none = rbe.null },
      big = 9007199254740993, ratio = 0.25, text = "quote \" and \\ and \n" }
    local r = db:query("select $1::jsonb as jb, $1::json as j, '[]'::jsonb as empty, "
      .. "'{\"a\": null, \"u\": \"\\u00e9\\ud83d\\ude00\"}'::json as esc, 'null'::jsonb as jnull, "
      .. "'\"str\"'::jsonb as jstr, '[1,[2,[3]]]'::jsonb as deep", doc)[1]
    for _, v in ipairs { r.jb, r.j } do
      assert.are.equal("rollback", v.name)
      assert.are.same({ 1, 2, 3 }, v.steps)
      assert.are.equal(true, v.nested.ok)
      assert.are.equal(rbe.null, v.nested.none)
      assert.are.equal(9007199254740993, v.big)
      assert.are.equal("integer", math.type(v.big))
      assert.are.equal(0.25, v.ratio)
      assert.are.equal("quote \" and \\ and \n", v.text)
    end
    assert.are.same({}, r.empty)
    assert.are.equal(rbe.null, r.esc.a)
    assert.are.equal("é😀", r.esc.u)
    assert.are.equal(rbe.null, r.jnull)
    assert.are.equal("str", r.jstr)
    assert.are.same({ 1, { 2, { 3 } } }, r.deep)
    -- an array-shaped table is a JSON array; __jsontype forces the shape
    local a = db:query("select $1::jsonb as a, $2::jsonb as e, $3::jsonb as o",
      { "x", "y" }, setmetatable({}, { __jsontype = "array" }), {})[1]
    assert.are.same({ "x", "y" }, a.a)
    assert.are.equal("[]", db:query("select $1::jsonb::text as t",
      setmetatable({}, { __jsontype = "array" }))[1].t)
    assert.are.equal("{}", db:query("select $1::jsonb::text as t", {})[1].t)
    local err = raises(db.query, db, "select $1::jsonb", { f = print })
    assert.truthy(tostring(err):find("cannot encode a function as JSON", 1, true), tostring(err))
    local cyc = {}
    cyc.self = cyc
    err = raises(db.query, db, "select $1::jsonb", cyc)
    assert.truthy(tostring(err):find("too deep", 1, true), tostring(err))
  end)

  it("arrays of every kind become Lua arrays", function()
    local db <close> = connect()
    local r = db:query([[select '{1,2,NULL,-4}'::int[] as ints, '{9223372036854775807}'::int8[] as big,
      array['a b', 'c,d', 'e"f', 'g\h', NULL, 'NULL', ''] as texts, '{{1,2},{3,4}}'::int[] as grid,
      '{}'::text[] as empty, '{t,f}'::bool[] as bools, '{1.5,2.25}'::float8[] as floats,
      '{1.10,2.20}'::numeric[] as nums, array['{"a":1}'::jsonb, '[2]'] as docs,
      array['\x0001'::bytea] as blobs, '[0:1]={7,8}'::int[] as shifted,
      array['2024-01-01'::date] as dates]])[1]
    assert.are.same({ 1, 2, rbe.null, -4 }, r.ints)
    assert.are.same({ math.maxinteger }, r.big)
    assert.are.same({ "a b", "c,d", 'e"f', "g\\h", rbe.null, "NULL", "" }, r.texts)
    assert.are.same({ { 1, 2 }, { 3, 4 } }, r.grid)
    assert.are.same({}, r.empty)
    assert.are.same({ true, false }, r.bools)
    assert.are.same({ 1.5, 2.25 }, r.floats)
    assert.are.same({ "1.10", "2.20" }, r.nums)
    assert.are.same({ { a = 1 }, { 2 } }, r.docs)
    assert.are.same({ "\0\1" }, r.blobs)
    assert.are.same({ 7, 8 }, r.shifted)
    assert.are.same({ "2024-01-01" }, r.dates)
  end)

  it("rows carry columns (names, type OIDs), command and affected", function()
    local db <close> = connect()
    db:exec("create table kv (k text primary key, v int)")
    local rows = db:query("insert into kv values ('a', 1), ('b', 2), ('c', 3)")
    assert.are.equal("INSERT 0 3", rows.command)
    assert.are.equal(3, rows.affected)
    assert.are.equal(0, #rows)
    rows = db:query("update kv set v = v + 10 where v > $1 returning k, v", 1)
    assert.are.equal("UPDATE 2", rows.command)
    assert.are.equal(2, rows.affected)
    assert.are.equal(2, #rows)
    assert.are.same({ { name = "k", type = 25, type_name = "text" },
      { name = "v", type = 23, type_name = "int4" } }, rows.columns)
    rows = db:query("delete from kv")
    assert.are.equal(3, rows.affected)
    rows = db:query("select k from kv")
    assert.are.equal(0, #rows)
    assert.are.equal("SELECT 0", rows.command)
    db:exec("drop table kv")
  end)

  it("a wrong parameter count is a clear error before anything is sent", function()
    local db <close> = connect()
    db:exec("create table cnt (a int, b int)")
    local err = raises(db.query, db, "insert into cnt values ($1, $2)", 1)
    assert.truthy(tostring(err):find("uses $1..$2 but 1 value was given", 1, true), tostring(err))
    err = raises(db.query, db, "insert into cnt values ($1, $2)", 1, 2, 3)
    assert.truthy(tostring(err):find("3 values were given", 1, true), tostring(err))
    err = raises(db.query, db, "select 1", 1)
    assert.truthy(tostring(err):find("no $1, $2", 1, true), tostring(err))
    assert.are.equal(0, db:query("select count(*)::int as n from cnt")[1].n)
    -- placeholders in literals, identifiers, comments and dollar quotes do not count
    assert.are.equal(0, pg._core._count_params([[select '$1', "a$2", E'\'$3', $$ $4 $$, $f$ $5 $f$ -- $6
      /* $7 /* $8 */ */ from x$9]]))
    assert.are.equal(10, pg._core._count_params("select $10, $2"))
    err = raises(db.query, db, "select $1", print)
    assert.truthy(tostring(err):find("parameter $1: cannot send a function", 1, true), tostring(err))
    db:exec("drop table cnt")
  end)
end)

describe("#pg errors", function()
  it("a unique violation carries SQLSTATE 23505 and the server's fields", function()
    local db <close> = connect()
    db:exec("create table uniq (id int primary key, v text)")
    db:query("insert into uniq values (1, 'a')")
    local err = raises(db.query, db, "insert into uniq values ($1, $2)", 1, "b")
    assert.are.equal("pg", err.kind)
    assert.are.equal("23505", err.code)
    assert.is_false(err.retryable)
    assert.are.equal("uniq_pkey", err.constraint)
    assert.are.equal("uniq", err.table)
    assert.are.equal("public", err.schema)
    assert.are.equal("Key (id)=(1) already exists.", err.detail)
    assert.are.equal("ERROR", err.severity)
    assert.truthy(err.message:find("duplicate key value", 1, true))
    assert.truthy(tostring(err):find("(23505)", 1, true))
    assert.truthy(err.sql:find("insert into uniq", 1, true))
    -- the connection goes on
    assert.are.equal(1, db:query("select count(*)::int as n from uniq")[1].n)
    db:exec("drop table uniq")
  end)

  it("a syntax error carries 42601 and the position", function()
    local db <close> = connect()
    local err = raises(db.query, db, "select 1 frm x where")
    assert.are.equal("42601", err.code)
    assert.are.equal("number", type(err.position))
    assert.is_true(err.position > 1)
    err = raises(db.query, db, "select * from no_such_table")
    assert.are.equal("42P01", err.code)
    err = raises(db.query, db, "select 1/0")
    assert.are.equal("22012", err.code)
    assert.are.equal(1, db:query("select 1 as x")[1].x)
  end)
end)

describe("#pg exec", function()
  it("runs a multi-statement script and returns each statement's tag and count", function()
    local db <close> = connect()
    local res = db:exec([[
      create table mig (id serial primary key, v text);
      insert into mig (v) values ('a'), ('b'), ('c');
      update mig set v = upper(v) where id > 1;
      select * from mig;
      drop table mig;
    ]])
    assert.are.equal(5, #res)
    assert.are.same({ command = "CREATE TABLE", affected = 0 }, res[1])
    assert.are.same({ command = "INSERT 0 3", affected = 3 }, res[2])
    assert.are.same({ command = "UPDATE 2", affected = 2 }, res[3])
    assert.are.same({ command = "SELECT 3", affected = 3 }, res[4])
    assert.are.same({ command = "DROP TABLE", affected = 0 }, res[5])
  end)

  it("a failing statement names its index and the script's implicit transaction is rolled back", function()
    local db <close> = connect()
    db:exec("create table mig2 (id int primary key)")
    local err = raises(db.exec, db, "insert into mig2 values (1); insert into mig2 values (2); "
      .. "insert into mig2 values (1); insert into mig2 values (3)")
    assert.are.equal("23505", err.code)
    assert.are.equal(3, err.statement)
    assert.truthy(err.message:find("statement 3 of the script", 1, true))
    assert.are.equal(0, db:query("select count(*)::int as n from mig2")[1].n)
    err = raises(db.exec, db, "select $1", 1)
    assert.truthy(tostring(err):find("takes no parameters", 1, true))
    db:exec("drop table mig2")
  end)
end)

describe("#pg transactions", function()
  it("commits, returns fn's results, and rolls back and re-raises on error", function()
    local db <close> = connect()
    db:exec("create table acct (id int primary key, bal int)")
    local a, b = db:tx(function(tx)
      tx:query("insert into acct values (1, 100), (2, 0)")
      return "moved", 2
    end)
    assert.are.equal("moved", a)
    assert.are.equal(2, b)
    local boom = { marker = true }
    local ok, err = pcall(db.tx, db, function(tx)
      tx:query("update acct set bal = bal - 50 where id = 1")
      error(boom)
    end)
    assert.is_false(ok)
    assert.are.equal(boom, err)
    assert.are.equal(100, db:query("select bal from acct where id = 1")[1].bal)
    err = raises(db.tx, db, function(tx)
      tx:query("insert into acct values (3, 1)")
      tx:query("insert into acct values (3, 1)")
    end)
    assert.are.equal("23505", err.code)
    assert.are.equal(2, db:query("select count(*)::int as n from acct")[1].n)
    assert.are.equal("idle", db:info().tx_status)
    -- the tx handle is over after its function
    local leaked
    db:tx(function(tx) leaked = tx end)
    err = raises(leaked.query, leaked, "select 1")
    assert.truthy(tostring(err):find("transaction is over", 1, true))
    db:exec("drop table acct")
  end)

  it("nests with savepoints", function()
    local db <close> = connect()
    db:exec("create table sp (v int)")
    db:tx(function(tx)
      tx:query("insert into sp values (1)")
      local ok = pcall(tx.tx, tx, function(inner)
        inner:query("insert into sp values (2)")
        inner:tx(function(inner2) inner2:query("insert into sp values (3)") end)
        error("undo the inner part")
      end)
      assert.is_false(ok)
      tx:tx(function(inner) inner:query("insert into sp values (4)") end)
    end)
    local vals = {}
    for _, r in ipairs(db:query("select v from sp order by v")) do vals[#vals + 1] = r.v end
    assert.are.same({ 1, 4 }, vals)
    db:exec("drop table sp")
  end)

  it("takes isolation and read_only options and checks them", function()
    local db <close> = connect()
    local iso = db:tx(function(tx)
      return tx:query("select current_setting('transaction_isolation') as i")[1].i
    end, { isolation = "serializable" })
    assert.are.equal("serializable", iso)
    local err = raises(db.tx, db, function(tx)
      tx:query("create table ro (x int)")
    end, { read_only = true, isolation = "repeatable read" })
    assert.are.equal("25006", err.code)
    err = raises(db.tx, db, function() end, { isolation = "chaos" })
    assert.truthy(tostring(err):find("isolation must be", 1, true))
    err = raises(db.tx, db, function() end, { readonly = true })
    assert.truthy(tostring(err):find("unknown option 'readonly'", 1, true))
  end)

  it("a COMMIT that rolled back (error caught inside) is an error", function()
    local db <close> = connect()
    local err = raises(db.tx, db, function(tx)
      pcall(tx.query, tx, "select 1/0")
    end)
    assert.are.equal("25P02", err.code)
    assert.truthy(tostring(err):find("rolled the transaction back", 1, true))
  end)

  it("other tasks' requests on the connection wait until the transaction ends", function()
    local db <close> = connect()
    db:exec("create table ord (seq serial, who text)")
    local inside = false
    local other
    db:tx(function(tx)
      tx:query("insert into ord (who) values ('tx-1')")
      other = rbe.spawn(function() db:query("insert into ord (who) values ('other')") end)
      rbe.sleep(0.05)
      inside = true
      tx:query("insert into ord (who) values ('tx-2')")
    end)
    other:join()
    assert.is_true(inside)
    local who = {}
    for _, r in ipairs(db:query("select who from ord order by seq")) do who[#who + 1] = r.who end
    assert.are.same({ "tx-1", "tx-2", "other" }, who)
    -- a second db:tx from the same task is a clear error, not a deadlock
    local err = raises(db.tx, db, function() db:tx(function() end) end)
    assert.truthy(tostring(err):find("already has a transaction open", 1, true))
    db:exec("drop table ord")
  end)

  it("retries a serialization failure when asked", function()
    local db <close> = connect()
    local other <close> = connect()
    db:exec("create table ser (id int primary key, v int); insert into ser values (1, 0)")
    local attempts = 0
    db:tx(function(tx)
      attempts = attempts + 1
      tx:query("select v from ser where id = 1")
      if attempts == 1 then other:query("update ser set v = v + 1 where id = 1") end
      tx:query("update ser set v = v + 10 where id = 1")
    end, { isolation = "repeatable read", retries = 2 })
    assert.are.equal(2, attempts)
    assert.are.equal(11, db:query("select v from ser")[1].v)
    -- without retries the 40001 error is raised, and it is retryable
    local err = raises(db.tx, db, function(tx)
      tx:query("select v from ser where id = 1")
      other:query("update ser set v = v + 1 where id = 1")
      tx:query("update ser set v = v + 10 where id = 1")
    end, { isolation = "serializable" })
    assert.are.equal("40001", err.code)
    assert.is_true(err.retryable)
    db:exec("drop table ser")
  end)
end)

describe("#pg pipeline", function()
  it("runs 1,000 queries in one round trip, results in order", function()
    local db <close> = connect()
    local res = db:pipeline(function(p)
      for i = 1, 1000 do p:query("select $1::int * 2 as v, $2::text as s", i, "n" .. i) end
    end)
    assert.are.equal(1000, #res)
    for i = 1, 1000 do
      assert.are.equal(i * 2, res[i][1].v)
      assert.are.equal("n" .. i, res[i][1].s)
    end
    -- a list works too
    res = db:pipeline { "select 1 as a", { "select $1::int as b", 2 } }
    assert.are.equal(1, res[1][1].a)
    assert.are.equal(2, res[2][1].b)
    assert.are.same({}, db:pipeline(function() end))
  end)

  it("a failing statement names its index and nothing of the pipeline is committed", function()
    local db <close> = connect()
    db:exec("create table pl (id int primary key)")
    local err = raises(db.pipeline, db, function(p)
      p:query("insert into pl values (1)")
      p:query("insert into pl values (2)")
      p:query("insert into pl values (1)")
      p:query("insert into pl values (3)")
    end)
    assert.are.equal("23505", err.code)
    assert.are.equal(3, err.statement)
    assert.truthy(err.sql:find("values (1)", 1, true))
    assert.are.equal(0, db:query("select count(*)::int as n from pl")[1].n)
    err = raises(db.pipeline, db, function(p) p:query("select $1", 1, 2) end)
    assert.truthy(tostring(err):find("statement 1:", 1, true))
    db:exec("drop table pl")
  end)
end)

describe("#pg copy", function()
  it("copy_out then copy_in of 100,000 rows", function()
    local db <close> = connect()
    db:exec([[create table src (id int primary key, name text, note text);
      insert into src select g, 'name ' || g, case when g % 7 = 0 then null else 'n,"' || g end
      from generate_series(1, 100000) g;
      create table dst (like src)]])
    local path = tmpname()
    local r = db:copy_out("copy src to stdout with (format csv)", path)
    assert.are.equal(100000, r.rows)
    assert.are.equal(path, r.path)
    local data = fs.read(path)
    assert.are.equal(#data, r.bytes)
    local _, lines = data:gsub("\n", "")
    assert.are.equal(100000, lines)
    assert.truthy(data:find('^1,name 1,"n,""1"\n'), data:sub(1, 40))
    -- no temporary file is left next to it
    local dir, base = path:match("^(.*)/([^/]*)$")
    for _, name in ipairs(fs.list(dir)) do
      assert.is_nil(name:find(base .. ".rbe-tmp", 1, true))
    end
    r = db:copy_in("copy dst from stdin with (format csv)", path)
    assert.are.equal(100000, r.rows)
    assert.are.equal(#data, r.bytes)
    local cmp = db:query([[select count(*)::int as n, sum(id)::int8 as s,
      count(*) filter (where note is null)::int as nulls,
      (select count(*) from (select * from src except select * from dst) d)::int as diff from dst]])[1]
    assert.are.equal(100000, cmp.n)
    assert.are.equal(5000050000, cmp.s)
    assert.are.equal(14285, cmp.nulls)
    assert.are.equal(0, cmp.diff)
    os.remove(path)
    db:exec("drop table src; drop table dst")
  end)

  it("failures: a bad COPY leaves no file, a missing input is an fs error", function()
    local db <close> = connect()
    local path = tmpname()
    local err = raises(db.copy_out, db, "copy no_such_table to stdout", path)
    assert.are.equal("42P01", err.code)
    assert.is_false(fs.exists(path))
    err = raises(db.copy_out, db, "select 1", path)
    assert.truthy(tostring(err):find("did not start COPY", 1, true), tostring(err))
    assert.is_false(fs.exists(path))
    err = raises(db.copy_in, db, "copy x from stdin", path)
    assert.are.equal("fs", err.kind)
    assert.are.equal("ENOENT", err.code)
    -- bad data in the file: the server's error, and the connection goes on
    db:exec("create table ci (a int)")
    fs.write(path, "1\nnot a number\n")
    err = raises(db.copy_in, db, "copy ci from stdin", path)
    assert.are.equal("22P02", err.code)
    -- COPY through query is refused and the connection stays usable
    err = raises(db.query, db, "copy ci to stdout")
    assert.truthy(tostring(err):find("use db:copy_out", 1, true), tostring(err))
    err = raises(db.query, db, "copy ci from stdin")
    assert.truthy(tostring(err):find("use db:copy_in", 1, true), tostring(err))
    assert.are.equal(0, db:query("select count(*)::int as n from ci")[1].n)
    os.remove(path)
    db:exec("drop table ci")
  end)
end)

describe("#pg listen/notify", function()
  it("an iterator of notifications", function()
    local db <close> = connect()
    local sender <close> = connect()
    local it = db:listen("Deploy Done")
    local t = rbe.spawn(function()
      rbe.sleep(0.05)
      sender:notify("Deploy Done", "v1")
      sender:query("select pg_notify('other', 'ignored')")
      sender:notify("Deploy Done", "v2")
    end)
    local n = it()
    assert.are.equal("Deploy Done", n.channel)
    assert.are.equal("v1", n.payload)
    assert.are.equal(sender:info().backend_pid, n.pid)
    assert.are.equal("v2", it().payload)
    t:join()
    -- notifications sent inside a transaction arrive at its commit
    sender:tx(function(tx) tx:notify("Deploy Done", "in-tx") end)
    assert.are.equal("in-tx", it().payload)
    db:unlisten("Deploy Done")
  end)

  it("a timeout when nothing arrives, and a cancelled wait leaves nothing behind", function()
    local db <close> = connect()
    local it = db:listen("quiet", { timeout = "100ms" })
    local err = raises(it)
    assert.are.equal("timeout", err.kind)
    assert.are.equal("ETIMEDOUT", err.code)
    local waiter = rbe.spawn(function() return db:listen("quiet")() end)
    rbe.sleep(0.05)
    waiter:cancel()
    assert.is_false(pcall(waiter.join, waiter))
    assert.are.equal("cancelled", waiter:status())
  end)
end)

describe("#pg timeouts and cancellation", function()
  it("a query timeout cancels on the server and the connection answers right after", function()
    local db <close> = connect()
    local admin <close> = connect()
    local t0 = rbe.now()
    local err = raises(db.query, db, { "select pg_sleep(30)", timeout = "200ms" })
    assert.are.equal("timeout", err.kind)
    assert.are.equal("ETIMEDOUT", err.code)
    assert.is_true(err.retryable)
    assert.truthy(tostring(err):find("cancelled on the server", 1, true))
    assert.are.equal(1, db:query("select 1 as one")[1].one)
    assert.is_true(rbe.now() - t0 < 10)
    assert.are.equal(0, #running(admin, "%pg_sleep%"))
    -- exec and the connection's default timeout
    local db2 <close> = connect({ timeout = "150ms" })
    err = raises(db2.exec, db2, "select pg_sleep(30); select 2")
    assert.are.equal("timeout", err.kind)
    assert.are.equal(2, db2:query("select 2 as two")[1].two)
    assert.are.equal(3, db2:query({ "select pg_sleep(0.3), 3 as three", timeout = 0 })[1].three)
  end)

  it("a request queued behind a slow one times out without disturbing it", function()
    local db <close> = connect()
    local slow = rbe.spawn(function() return db:query("select pg_sleep(0.4), 'slow' as s")[1].s end)
    rbe.sleep(0.02)
    local err = raises(db.query, db, { "select 1", timeout = "100ms" })
    assert.are.equal("timeout", err.kind)
    assert.truthy(tostring(err):find("queued behind", 1, true))
    assert.are.equal("slow", slow:join())
  end)

  it("rbe.timeout and task:cancel stop a query the same way", function()
    local db <close> = connect()
    local admin <close> = connect()
    local err = raises(rbe.timeout, "150ms", db.query, db, "select pg_sleep(30)")
    assert.are.equal("timeout", err.kind)
    assert.are.equal(5, db:query("select 5 as v")[1].v)
    local t = rbe.spawn(function() return db:query("select pg_sleep(30)") end)
    wait_until(function() return #running(admin, "select pg_sleep(30)") == 1 end, 10, "the sleep to start")
    t:cancel()
    assert.is_false(pcall(t.join, t))
    assert.are.equal("cancelled", t:status())
    assert.are.equal(6, db:query("select 6 as v")[1].v)
    assert.are.equal(0, #running(admin, "%pg_sleep%"))
    -- a cancelled transaction is rolled back
    db:exec("create table canc (v int)")
    t = rbe.spawn(function()
      db:tx(function(tx)
        tx:query("insert into canc values (1)")
        tx:query("select pg_sleep(30)")
      end)
    end)
    wait_until(function() return #running(admin, "select pg_sleep(30)") == 1 end, 10, "the sleep to start")
    t:cancel()
    assert.is_false(pcall(t.join, t))
    assert.are.equal(0, db:query("select count(*)::int as n from canc")[1].n)
    assert.are.equal("idle", db:info().tx_status)
    db:exec("drop table canc")
  end)

  it("closing with a query in flight cancels it", function()
    local db = connect()
    local admin <close> = connect()
    local t = rbe.spawn(function() return db:query("select pg_sleep(30)") end)
    wait_until(function() return #running(admin, "select pg_sleep(30)") == 1 end, 10, "the sleep to start")
    db:close()
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.are.equal("pg", err.kind)
    assert.are.equal("08003", err.code)
    assert.truthy(tostring(err):find("was closed", 1, true))
    wait_until(function() return #running(admin, "%pg_sleep%") == 0 end, 10, "the server to stop the query")
  end)

  it("tasks sharing a connection are served in order (FIFO)", function()
    local db <close> = connect()
    db:exec("create table fifo (seq serial, i int)")
    local tasks = {}
    for i = 1, 50 do
      tasks[i] = rbe.spawn(function() db:query("insert into fifo (i) values ($1)", i) end)
    end
    for _, t in ipairs(tasks) do t:join() end
    local got = {}
    for _, r in ipairs(db:query("select i from fifo order by seq")) do got[#got + 1] = r.i end
    local want = {}
    for i = 1, 50 do want[i] = i end
    assert.are.same(want, got)
    db:exec("drop table fifo")
  end)
end)

describe("#pg lost connections", function()
  it("a backend killed mid-query gives a retryable error, and the handle says so next time", function()
    local db <close> = connect()
    local admin <close> = connect()
    local pid = db:info().backend_pid
    local t = rbe.spawn(function() return db:query("select pg_sleep(30)") end)
    wait_until(function() return #running(admin, "select pg_sleep(30)") == 1 end, 10, "the sleep to start")
    assert.is_true(admin:query("select pg_terminate_backend($1) as ok", pid)[1].ok)
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.are.equal("pg", err.kind)
    assert.is_true(err.retryable)
    assert.are.equal("57P01", err.code)
    assert.are.equal("broken", db:status())
    err = raises(db.query, db, "select 1")
    assert.are.equal("pg", err.kind)
    assert.are.equal("08003", err.code)
    assert.is_true(err.retryable)
    assert.truthy(tostring(err):find("was lost earlier", 1, true), tostring(err))
    assert.is_nil(tostring(err):find(PASSWORD, 1, true))
  end)

  it("an idle connection whose backend is killed is seen as broken", function()
    local db <close> = connect()
    local admin <close> = connect()
    admin:query("select pg_terminate_backend($1)", db:info().backend_pid)
    wait_until(function() return db:status() == "broken" end, 10, "the connection to break")
    assert.is_true(raises(db.query, db, "select 1").retryable)
  end)
end)

describe("#pg pool", function()
  it("100 concurrent queries through a pool of 8", function()
    local pool <close> = pg.pool(URL, { size = 8, dbname = DBNAME, application_name = "rbe-pool-spec" })
    local admin <close> = connect()
    local peak, fns = 0, {}
    for i = 1, 100 do
      fns[i] = function()
        local r = pool:query("select $1::int as i, pg_sleep(0.01)", i)
        peak = math.max(peak, pool:stats().in_use)
        return r[1].i
      end
    end
    local res = rbe.parallel(fns)
    for i = 1, 100 do assert.are.equal(i, res[i]) end
    local s = pool:stats()
    assert.is_true(peak <= 8)
    assert.are.equal(8, s.opened)
    assert.are.equal(8, s.idle)
    assert.are.equal(0, s.in_use)
    local n = admin:query("select count(*)::int as n from pg_stat_activity where application_name = $1",
      "rbe-pool-spec")[1].n
    assert.are.equal(8, n)
    assert.truthy(tostring(pool):find("8/8 open", 1, true))
  end)

  it("tx, exec, with and broken connections being replaced", function()
    local pool <close> = pg.pool(URL, { size = 2, dbname = DBNAME })
    local admin <close> = connect()
    pool:exec("create table pooled (v int)")
    pool:tx(function(tx) tx:query("insert into pooled values (1)") end)
    assert.is_false(pcall(pool.tx, pool, function(tx)
      tx:query("insert into pooled values (2)")
      error("no")
    end))
    local pids = pool:with(function(c1)
      return { c1:info().backend_pid, pool:with(function(c2) return c2:info().backend_pid end) }
    end)
    assert.are_not.equal(pids[1], pids[2])
    for _, pid in ipairs(pids) do admin:query("select pg_terminate_backend($1)", pid) end
    rbe.sleep(0.1)
    assert.are.equal(1, pool:query("select count(*)::int as n from pooled")[1].n)
    assert.is_true(pool:stats().discarded >= 1)
    -- a failing query on a healthy connection keeps it in the pool
    local before = pool:stats().opened
    assert.is_false(pcall(pool.query, pool, "select 1/0"))
    pool:query("select 1")
    assert.are.equal(before, pool:stats().opened)
    pool:exec("drop table pooled")
    pool:close()
    assert.truthy(tostring(raises(pool.query, pool, "select 1")):find("pool is closed", 1, true))
  end)

  it("acquire_timeout when every connection is busy", function()
    local pool <close> = pg.pool(URL, { size = 1, dbname = DBNAME, acquire_timeout = "100ms" })
    local t = rbe.spawn(function() return pool:query("select pg_sleep(0.5)") end)
    rbe.sleep(0.05)
    local err = raises(pool.query, pool, "select 1")
    assert.are.equal("timeout", err.kind)
    t:join()
    assert.are.equal(1, pool:query("select 1 as x")[1].x)
  end)
end)

describe("#pg private server", function()
  local dir, env, bindir, root

  local function pgctl(...)
    local cmd = { bindir .. "/pg_ctl", ... }
    if root then cmd = { "runuser", "-u", "postgres", "--", table.unpack(cmd) } end
    -- the server must not inherit our pipes: proc.run would wait for them
    return proc.run(cmd, { cwd = "/", timeout = "60s", stdout = "null", stderr = "null" })
  end

  local file_kv = require("support").read_kv

  setup(function()
    dir = fs.tmpdir("rbe-pg-spec")
    proc.run({ SERVERS, "start", dir, "pg" }, { timeout = "90s" })
    env = file_kv(dir .. "/env")
    bindir = env.RBE_TEST_PG_BINDIR
    root = proc.output({ "id", "-u" }) == "0"
  end)

  teardown(function()
    if dir then proc.run({ SERVERS, "stop", dir }, { timeout = "60s", check = false }) end
    if dir then fs.remove(dir, { recursive = true, missing_ok = true }) end
  end)

  it("a pool recovers when the server restarts mid-run", function()
    local pool <close> = pg.pool(env.RBE_TEST_PG_URL, { size = 4, connect_timeout = "2s" })
    local res = rbe.parallel({
      function() return pool:query("select 1 as x")[1].x end,
      function() return pool:query("select 2 as x")[1].x end,
    })
    assert.are.same({ 1, 2, n = 2 }, res)
    local inflight = rbe.spawn(function() return pool:query("select pg_sleep(30)") end)
    rbe.sleep(0.1)
    local data = file_kv(dir .. "/state").PGROOT .. "/data"
    pgctl("restart", "-D", data, "-m", "fast", "-w", "-t", "30")
    local ok, err = pcall(inflight.join, inflight)
    assert.is_false(ok)
    assert.is_true(err.retryable, tostring(err))
    -- the idle connections died with the server: the pool replaces them
    local answer, failures = nil, 0
    wait_until(function()
      local ok2, r = rbe.try(pool.query, pool, "select 42 as x")
      if ok2 then answer = r[1].x return true end
      assert.is_true(r.retryable, tostring(r))
      failures = failures + 1
      return false
    end, 20, "the pool to recover")
    assert.are.equal(42, answer)
    local s = pool:stats()
    assert.is_true(s.discarded >= 2, "discarded " .. s.discarded)
    assert.is_true(s.opened >= 3, "opened " .. s.opened)
    assert.are.same({ 1, 2, 3, n = 3 }, rbe.parallel({
      function() return pool:query("select 1 as x")[1].x end,
      function() return pool:query("select 2 as x")[1].x end,
      function() return pool:query("select 3 as x")[1].x end,
    }))
  end)

  it("connect_timeout when the server does not answer", function()
    local data = file_kv(dir .. "/state").PGROOT .. "/data"
    local pid = fs.lines(data .. "/postmaster.pid")()
    proc.run({ "kill", "-STOP", pid })
    local ok, err = pcall(pg.connect, env.RBE_TEST_PG_URL, { connect_timeout = "300ms" })
    proc.run({ "kill", "-CONT", pid })
    assert.is_false(ok)
    assert.are.equal("timeout", err.kind)
    assert.are.equal("ETIMEDOUT", err.code)
    assert.is_true(err.retryable)
    assert.truthy(tostring(err):find("within 0.3s", 1, true), tostring(err))
    assert.is_nil(tostring(err):find("rbe-test-pw", 1, true))
    local db <close> = pg.connect(env.RBE_TEST_PG_URL)
    assert.are.equal(1, db:query("select 1 as x")[1].x)
  end)
end)
