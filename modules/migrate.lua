-- migrate: golang-migrate's migrations, driven from a playbook.  A
-- directory of `{version}_{title}.up.sql` / `.down.sql` files and the
-- tracking table `schema_migrations(version bigint, dirty boolean)` (one
-- row: the current version) are read and written exactly as golang-migrate
-- does, and its advisory lock id is used, so rbe and `migrate` never run
-- at once.  Unlike golang-migrate, each file runs in its own transaction
-- together with the tracking row's update: a failing file is rolled back
-- with the row, and the error names the version, the file and the
-- statement; the table never says "dirty" behind anyone's back.  Files
-- that cannot run in a transaction (CREATE INDEX CONCURRENTLY, their own
-- BEGIN/COMMIT) run golang-migrate's way: dirty, run, clean.  An optional
-- `{version}_{title}.verify.sql` (sqitch style) runs after the step that
-- leaves that version current, inside the same transaction.  sqitch's
-- registry and flyway_schema_history are read to report what they applied.
--
--   migrate.read_dir(dir) -> migrations (ascending)
--   migrate.status(db, dir[, opts]) -> {version, dirty, migrations, ...}  [yields]
--   migrate.plan(db, dir, {to | steps, direction}) -> {files, from, to}  [yields]
--   migrate.down(db, dir, {to | steps}) / migrate.up(...) -> result       [yields]
--   migrate.force(db, version[, opts]), migrate.registry(db)              [yields]
--   migrate.lock_id(dbname[, schema, table]) -> golang-migrate's lock key
--   migrate.down_step{...}, migrate.up_step{...}
--
-- See docs/modules/migrate.md.
local rbe = require "rbe"
local kit = require "rbe.stepkit"
local fs = require "rbe.fs"

local type, pairs, ipairs, error, tostring, tonumber, pcall =
  type, pairs, ipairs, error, tostring, tonumber, pcall
local format, concat = string.format, table.concat

local M = {}

M.DEFAULT_TABLE = "schema_migrations"

local merror = kit.error_for("migrate")

local check_fields = kit.check_fields

local function check_db(db, fname)
  if db == nil or type(db) == "string" or type(db.query) ~= "function"
     or type(db.tx) ~= "function" then
    error(fname .. ": an rbe.pg connection expected", 3)
  end
end

local function quote_ident(name) return '"' .. name:gsub('"', '""') .. '"' end

---------------------------------------------------------------------------
-- golang-migrate's advisory lock id: crc32 (IEEE) of "schema\0table\0db"
-- times 1486364155, as an unsigned 32-bit number

local CRC = {}
for i = 0, 255 do
  local c = i
  for _ = 1, 8 do
    if c & 1 == 1 then c = 0xEDB88320 ~ (c >> 1) else c = c >> 1 end
  end
  CRC[i] = c
end

local function crc32(s)
  local c = 0xFFFFFFFF
  for i = 1, #s do
    c = CRC[(c ~ s:byte(i)) & 0xFF] ~ (c >> 8)
  end
  return c ~ 0xFFFFFFFF
end
M._crc32 = crc32

-- migrate.lock_id(dbname[, schema = "public", table = "schema_migrations"])
function M.lock_id(dbname, schema, tbl)
  local s = concat({ schema or "public", tbl or M.DEFAULT_TABLE, dbname }, "\0")
  return (crc32(s) * 1486364155) & 0xFFFFFFFF
end

---------------------------------------------------------------------------
-- the directory

-- migrate.read_dir(dir) -> array of {version, title, up, down, verify}
-- (paths), ascending by version.  Names as golang-migrate parses them:
-- {version}_{title}.{up|down}.{ext}; only .sql files are used.
function M.read_dir(dir)
  if type(dir) ~= "string" or dir == "" then error("migrate: migrations directory expected", 3) end
  local by, list = {}, {}
  for _, name in ipairs(fs.list(dir)) do
    local v, title, kind = name:match("^(%d+)_(.-)%.(up)%.sql$")
    if not v then v, title, kind = name:match("^(%d+)_(.-)%.(down)%.sql$") end
    if not v then v, title, kind = name:match("^(%d+)_(.-)%.(verify)%.sql$") end
    if v then
      local version = math.tointeger(tonumber(v))
      if not version or #v > 19 then
        error(merror("EINVAL", format("%s/%s: version %s does not fit a bigint", dir, name, v)), 0)
      end
      local m = by[version]
      if not m then
        m = { version = version, title = title }
        by[version] = m
        list[#list + 1] = m
      end
      if m[kind] then
        error(merror("EDUPLICATE", format("%s: two %s files for version %d (%s and %s)",
          dir, kind, version, m[kind]:match("[^/]*$"), name)), 0)
      end
      m[kind] = dir .. "/" .. name
      if kind ~= "verify" then m.title = title end
    end
  end
  table.sort(list, function(a, b) return a.version < b.version end)
  return list
end

local function file_name(path) return path and path:match("[^/]*$") end

---------------------------------------------------------------------------
-- SQL: does a file need to run outside a transaction?

-- statements of a script, split at top-level semicolons (quotes, dollar
-- quotes, comments and BEGIN ATOMIC ... END bodies respected); returns the
-- first words (upper-cased) of each statement
local function statement_heads(sql)
  local heads, words = {}, {}
  local i, n = 1, #sql
  local atomic, case_depth, prev = 0, 0, nil
  local function flush()
    if #words > 0 then heads[#heads + 1] = concat(words, " ") end
    words = {}
  end
  while i <= n do
    local c = sql:sub(i, i)
    local two = sql:sub(i, i + 1)
    if two == "--" then
      i = (sql:find("\n", i, true) or n) + 1
    elseif two == "/*" then
      local depth = 1
      i = i + 2
      while i <= n and depth > 0 do
        local t = sql:sub(i, i + 1)
        if t == "/*" then depth = depth + 1; i = i + 2
        elseif t == "*/" then depth = depth - 1; i = i + 2
        else i = i + 1 end
      end
    elseif c == "'" or c == '"' then
      local escapes = c == "'" and sql:sub(i - 1, i - 1):match("[eE]") ~= nil
      i = i + 1
      while i <= n do
        local d = sql:sub(i, i)
        if escapes and d == "\\" then i = i + 2
        elseif d == c then
          if sql:sub(i + 1, i + 1) == c then i = i + 2 else i = i + 1 break end
        else i = i + 1 end
      end
    elseif c == "$" and sql:match("^%$[%a_][%w_]*%$", i) or two == "$$" then
      local tag = sql:match("^%$[%a_]?[%w_]*%$", i)
      local close = sql:find(tag, i + #tag, true)
      i = close and (close + #tag) or (n + 1)
    elseif c == ";" then
      if atomic == 0 then flush() end
      i = i + 1
    elseif c:match("[%a_]") then
      local w = sql:match("^[%w_]+", i)
      local up = w:upper()
      if #words < 4 then words[#words + 1] = up end
      if up == "ATOMIC" and prev == "BEGIN" then
        atomic = atomic + 1
      elseif atomic > 0 and up == "CASE" then case_depth = case_depth + 1
      elseif atomic > 0 and up == "END" then
        if case_depth > 0 then case_depth = case_depth - 1 else atomic = atomic - 1 end
      end
      prev = up
      i = i + #w
    else
      i = i + 1
    end
  end
  flush()
  return heads
end
M._statement_heads = statement_heads

local NO_TX = {
  "^BEGIN", "^START TRANSACTION", "^COMMIT", "^END$", "^END TRANSACTION", "^ROLLBACK",
  "^CREATE INDEX CONCURRENTLY", "^CREATE UNIQUE INDEX CONCURRENTLY",
  "^DROP INDEX CONCURRENTLY", "^REINDEX", "^VACUUM", "^CREATE DATABASE",
  "^DROP DATABASE", "^ALTER SYSTEM", "^CREATE TABLESPACE", "^DROP TABLESPACE",
}

-- true (and the statement) when the script cannot run inside our
-- transaction; a `-- rbe:no-transaction` line says so explicitly
local function needs_no_tx(sql)
  if sql:find("%-%-%s*rbe:no%-transaction") then return true, "-- rbe:no-transaction" end
  for _, h in ipairs(statement_heads(sql)) do
    for _, p in ipairs(NO_TX) do
      if h:find(p) then return true, h end
    end
    if h:find("^REFRESH MATERIALIZED VIEW CONCURRENTLY") then return true, h end
  end
  return false
end
M._needs_no_tx = needs_no_tx

---------------------------------------------------------------------------
-- the tracking table

local function table_parts(opts)
  local t = opts.table or M.DEFAULT_TABLE
  local s, name = t:match("^([^.]+)%.([^.]+)$")
  return s, name or t
end

-- {qualified name, schema, table name, exists, version, dirty}
local function tracking(db, opts)
  local schema, name = table_parts(opts)
  local row = db:query([[
    select coalesce($1, current_schema()) as schema, current_database() as dbname,
           to_regclass(quote_ident(coalesce($1, current_schema())) || '.' || quote_ident($2))
             is not null as exists]], schema or rbe.null, name)[1]
  local tr = { schema = row.schema, name = name, dbname = row.dbname, exists = row.exists,
               qualified = quote_ident(row.schema) .. "." .. quote_ident(name) }
  if tr.exists then
    local cols = {}
    for _, r in ipairs(db:query("select attname from pg_attribute where attrelid = $1::regclass "
        .. "and attnum > 0 and not attisdropped", tr.qualified)) do
      cols[r.attname] = true
    end
    if not (cols.version and cols.dirty) then
      error(merror("EINVAL", format("%s exists but is not golang-migrate's table (it needs "
        .. "the columns version and dirty); give another table with {table = ...}",
        tr.qualified)), 0)
    end
    local rows = db:query(format("select version, dirty from %s", tr.qualified))
    if #rows > 1 then
      error(merror("EINVAL", format("%s has %d rows; golang-migrate keeps exactly one",
        tr.qualified, #rows)), 0)
    end
    if rows[1] then tr.version, tr.dirty = rows[1].version, rows[1].dirty end
  end
  tr.dirty = tr.dirty == true
  return tr
end

local function ensure_table(db, tr)
  if tr.exists then return end
  db:query(format("create table if not exists %s (version bigint not null primary key, "
    .. "dirty boolean not null)", tr.qualified))
  tr.exists = true
end

local function set_version(q, tr, version, dirty)
  q:query(format("delete from %s", tr.qualified))
  if version then
    q:query(format("insert into %s (version, dirty) values ($1, $2)", tr.qualified),
      version, dirty and true or false)
  end
end

---------------------------------------------------------------------------
-- other tools' registries (read only)

-- migrate.registry(db) -> {golang_migrate = {table, version, dirty},
-- sqitch = {projects = {{project, change, committed_at, changes}}},
-- flyway = {table, version, description, installed_on, applied, failed}}
-- (only the tools found)
function M.registry(db, opts)
  check_db(db, "migrate.registry")
  opts = check_fields(opts, { table = true }, "migrate.registry")
  local out = {}
  local tr = tracking(db, opts)
  if tr.exists then
    out.golang_migrate = { table = tr.qualified, version = tr.version, dirty = tr.dirty }
  end
  if db:query("select to_regclass('sqitch.changes') is not null as x")[1].x then
    local projects = {}
    for _, r in ipairs(db:query([[
        select project, count(*) as changes, max(committed_at)::text as committed_at,
               (array_agg(change order by committed_at desc))[1] as change
          from sqitch.changes group by project order by project]])) do
      projects[#projects + 1] = { project = r.project, change = r.change,
        committed_at = r.committed_at, changes = r.changes }
    end
    out.sqitch = { projects = projects }
  end
  local fw = db:query([[
    select quote_ident(n.nspname) || '.' || quote_ident(c.relname) as t
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.relname = 'flyway_schema_history' and c.relkind in ('r', 'p')
     order by n.nspname = current_schema() desc limit 1]])[1]
  if fw then
    local last = db:query(format([[
      select version, description, installed_on::text as installed_on from %s
       where success and version is not null order by installed_rank desc limit 1]], fw.t))[1]
    local failed = {}
    for _, r in ipairs(db:query(format("select version, description, script from %s "
        .. "where not success order by installed_rank", fw.t))) do
      failed[#failed + 1] = { version = r.version ~= rbe.null and r.version or nil,
        description = r.description, script = r.script }
    end
    local applied = db:query(format("select count(*) as n from %s where success", fw.t))[1].n
    out.flyway = { table = fw.t, version = last and last.version or nil,
      description = last and last.description or nil,
      installed_on = last and last.installed_on or nil, applied = applied, failed = failed }
  end
  return out
end

---------------------------------------------------------------------------
-- status and plans

-- migrate.status(db, dir[, {table}]) -> {version, dirty, table, exists,
-- migrations = {{version, title, up, down, verify, applied}}, applied,
-- pending, current, known, others}
function M.status(db, dir, opts)
  check_db(db, "migrate.status")
  opts = check_fields(opts, { table = true }, "migrate.status")
  local list = M.read_dir(dir)
  local tr = tracking(db, opts)
  local st = { version = tr.version, dirty = tr.dirty, table = tr.qualified, exists = tr.exists,
               migrations = list, applied = 0, pending = 0, known = tr.version == nil }
  for _, m in ipairs(list) do
    m.applied = tr.version ~= nil and m.version <= tr.version
    if m.applied then st.applied = st.applied + 1 else st.pending = st.pending + 1 end
    if m.version == tr.version then st.current, st.known = m, true end
  end
  local others = M.registry(db, opts)
  others.golang_migrate = nil
  st.others = others
  return st
end

local function fmt_version(v) return v and tostring(v) or "none" end

-- the steps a down/up would take: {{m, file, new_version}}, from, to
local function steps_for(list, tr, direction, opts, fname)
  local cur = tr.version
  local idx = 0
  if cur ~= nil then
    for i, m in ipairs(list) do
      if m.version == cur then idx = i end
    end
    if idx == 0 then
      error(merror("ENOVERSION", format("%s: the database is at version %d, which has no "
        .. "migration in the directory", fname, cur), { version = cur }), 0)
    end
  end
  local steps = {}
  if opts.to ~= nil and opts.steps ~= nil then
    error(fname .. ": give to or steps, not both", 0)
  end
  local to = opts.to
  if to ~= nil then
    to = math.tointeger(tonumber(to))
    if to == nil then error(fname .. ": to must be a version number", 0) end
    local found = to == 0 and direction == "down"
    for _, m in ipairs(list) do
      if m.version == to then found = true end
    end
    if not found then
      error(merror("ENOVERSION", format("%s: version %s is not in the directory", fname,
        tostring(opts.to))), 0)
    end
  end
  if direction == "down" then
    local last = 1
    if opts.steps ~= nil then
      if math.type(opts.steps) ~= "integer" or opts.steps < 0 then
        error(fname .. ": steps must be a non-negative integer", 0)
      end
      if opts.steps > idx then
        error(merror("ERANGE", format("%s: %d step(s) down asked, but only %d "
          .. "migration(s) are applied", fname, opts.steps, idx)), 0)
      end
      last = idx - opts.steps + 1
    elseif to ~= nil and to ~= 0 then
      if to > (cur or -1) then
        error(merror("ERANGE", format("%s: version %d is above the current version %s",
          fname, to, fmt_version(cur))), 0)
      end
      for i, m in ipairs(list) do
        if m.version == to then last = i + 1 end
      end
    elseif to == nil then
      error(fname .. ": to (a version, or 0 for everything) or steps is required", 0)
    end
    for i = idx, last, -1 do
      local m = list[i]
      local new = i > 1 and list[i - 1].version or nil
      if not m.down then
        error(merror("ENODOWN", format("%s: version %d (%s) has no .down.sql file",
          fname, m.version, m.title), { version = m.version }), 0)
      end
      steps[#steps + 1] = { m = m, file = m.down, new = new,
        verify = i > 1 and list[i - 1].verify or nil }
    end
  else
    local first, last = idx + 1, #list
    if opts.steps ~= nil then
      if math.type(opts.steps) ~= "integer" or opts.steps < 0 then
        error(fname .. ": steps must be a non-negative integer", 0)
      end
      last = math.min(#list, idx + opts.steps)
      if idx + opts.steps > #list then
        error(merror("ERANGE", format("%s: %d step(s) up asked, but only %d migration(s) "
          .. "are pending", fname, opts.steps, #list - idx)), 0)
      end
    elseif to ~= nil then
      if to < (cur or -1) then
        error(merror("ERANGE", format("%s: version %d is below the current version %s",
          fname, to, fmt_version(cur))), 0)
      end
      for i, m in ipairs(list) do
        if m.version == to then last = i end
      end
    end
    for i = first, last do
      local m = list[i]
      if not m.up then
        error(merror("ENOUP", format("%s: version %d (%s) has no .up.sql file",
          fname, m.version, m.title), { version = m.version }), 0)
      end
      steps[#steps + 1] = { m = m, file = m.up, new = m.version, verify = m.verify }
    end
  end
  local final = cur
  if #steps > 0 then final = steps[#steps].new end
  return steps, cur, final
end

local PLAN_OPTS = { to = true, steps = true, table = true, direction = true }

-- migrate.plan(db, dir, {direction = "down", to | steps, table}) ->
-- {direction, from, to, files = {path, ...}, versions = {...}}
function M.plan(db, dir, opts)
  check_db(db, "migrate.plan")
  opts = check_fields(opts, PLAN_OPTS, "migrate.plan")
  local direction = opts.direction or "down"
  local list = M.read_dir(dir)
  local tr = tracking(db, opts)
  local steps, from, to = steps_for(list, tr, direction, opts, "migrate.plan")
  local files, versions = {}, {}
  for i, s in ipairs(steps) do files[i], versions[i] = s.file, s.m.version end
  return { direction = direction, from = from, to = to, files = files, versions = versions,
           dirty = tr.dirty }
end

---------------------------------------------------------------------------
-- the advisory lock

local function holder(db, key)
  local rows = db:query([[
    select a.pid, a.usename, a.application_name, a.client_addr::text as client_addr,
           a.backend_start::text as since
      from pg_locks l join pg_stat_activity a on a.pid = l.pid
     where l.locktype = 'advisory' and l.classid = $1 and l.objid = $2 and l.objsubid = 1
       and l.granted
       and l.database = (select oid from pg_database where datname = current_database())]],
    (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)
  return rows[1]
end

local function with_lock(db, tr, opts, fn)
  local key = M.lock_id(tr.dbname, tr.schema, tr.name)
  local limit = opts.lock_timeout
  if limit == nil then limit = 30 end
  limit = limit and rbe.duration(limit)
  local t0 = rbe.now()
  while not db:query("select pg_try_advisory_lock($1) as ok", key)[1].ok do
    if limit and rbe.now() - t0 >= limit then
      local h = holder(db, key)
      local who = h and format("backend %d (user %s, application %q, from %s, connected "
        .. "since %s)", h.pid, tostring(h.usename), tostring(h.application_name),
        tostring(h.client_addr ~= rbe.null and h.client_addr or "local socket"),
        tostring(h.since)) or "another session"
      error(merror("ELOCKED", format("another migration holds the lock of %s (advisory "
        .. "lock %d, golang-migrate's): %s; waited %gs", tr.qualified, key, who, limit),
        { lock_id = key, holder = h and h.pid or nil, retryable = true }), 0)
    end
    rbe.sleep(0.2)
  end
  local res = table.pack(pcall(fn))
  rbe.shield(pcall, db.query, db, "select pg_advisory_unlock($1)", key)
  if not res[1] then error(res[2], 0) end
  return table.unpack(res, 2, res.n)
end

---------------------------------------------------------------------------
-- running

local function describe_m(m) return format("%d_%s", m.version, m.title) end

local function run_steps(db, dir, direction, opts, fname)
  local list = M.read_dir(dir)
  local tr = tracking(db, opts)
  ensure_table(db, tr)
  return with_lock(db, tr, opts, function()
    tr = tracking(db, opts)                       -- again, under the lock
    if tr.dirty then
      error(merror("EDIRTY", format("%s: %s says version %d is dirty: a migration "
        .. "failed half-way outside a transaction. Check the schema by hand, then "
        .. "migrate.force(db, version) to the version it is really at", fname,
        tr.qualified, tr.version), { version = tr.version }), 0)
    end
    local steps, from = steps_for(list, tr, direction, opts, fname)
    local result = { direction = direction, from = from, to = from, applied = {} }
    for _, s in ipairs(steps) do
      local sql = fs.read(s.file)
      local verify = s.verify and fs.read(s.verify)
      local no_tx, why = needs_no_tx(sql)
      local t0 = rbe.now()
      local ok, err
      if no_tx then
        set_version(db, tr, s.new, true)
        ok, err = rbe.try(function()
          db:exec(sql)
          if verify then db:exec(verify) end
        end)
        if ok then set_version(db, tr, s.new, false) end
      else
        ok, err = rbe.try(db.tx, db, function(tx)
          tx:exec(sql)
          if verify then
            local vok, verr = rbe.try(tx.exec, tx, verify)
            if not vok then
              verr.verify = s.verify
              error(verr, 0)
            end
          end
          set_version(tx, tr, s.new, false)
        end)
      end
      if not ok then
        if err.kind == "cancelled" or err.kind == "timeout" then
          if type(err) == "table" then err.from, err.done = result.from, result.applied end
          error(err, 0)
        end
        local done = {}
        for i, a in ipairs(result.applied) do done[i] = tostring(a.version) end
        local where = err.verify and ("its verify file " .. file_name(err.verify))
          or (err.statement and format("statement %d of %s", err.statement, file_name(s.file)))
          or file_name(s.file)
        local state = no_tx
          and format("it ran outside a transaction (%s), so %s is left at version %s, "
            .. "DIRTY: check the schema, then migrate.force", why, tr.qualified, fmt_version(s.new))
          or format("rolled back: the database is still at version %s, clean",
            fmt_version(result.to))
        local msg = format("%s %s failed at %s: %s; %s%s", direction, describe_m(s.m), where,
          tostring(err.message or err):gsub("^db:exec: ", ""), state,
          #done > 0 and format(" (%s in this run before it: %s)",
            direction == "down" and "reverted" or "applied", concat(done, ", ")) or "")
        error(merror(err.code or "EMIGRATE", msg, { version = s.m.version, file = s.file,
          statement = err.statement, cause = err, dirty = no_tx or nil,
          from = result.from, done = result.applied }), 0)
      end
      result.to = s.new
      result.applied[#result.applied + 1] = { version = s.m.version, title = s.m.title,
        file = s.file, seconds = rbe.now() - t0, no_transaction = no_tx or nil }
    end
    return result
  end)
end

local RUN_OPTS = { to = true, steps = true, table = true, lock_timeout = true }

-- a pool lends one connection for the whole run: the advisory lock is
-- held by a session
local function on_conn(db, fn, ...)
  if type(db.with) == "function" and type(db.acquire) == "function" then
    return db:with(fn, ...)
  end
  return fn(db, ...)
end

-- migrate.down(db, dir, {to = version | steps = n, table, lock_timeout})
-- -> {direction, from, to, applied = {{version, title, file, seconds}}}
-- Down files run newest first, each in its own transaction with the
-- tracking row; `to = 0` reverts everything.
function M.down(db, dir, opts)
  check_db(db, "migrate.down")
  opts = check_fields(opts, RUN_OPTS, "migrate.down")
  return on_conn(db, run_steps, dir, "down", opts, "migrate.down")
end

-- migrate.up(db, dir[, {to | steps, table, lock_timeout}]) -> the same;
-- without to/steps every pending migration
function M.up(db, dir, opts)
  check_db(db, "migrate.up")
  opts = check_fields(opts, RUN_OPTS, "migrate.up")
  return on_conn(db, run_steps, dir, "up", opts, "migrate.up")
end

-- migrate.force(db, version | nil[, {table}]) -> nothing: set the tracking
-- row (clean) without running anything, as `migrate force` does
function M.force(db, version, opts)
  check_db(db, "migrate.force")
  opts = check_fields(opts, { table = true }, "migrate.force")
  if version ~= nil and math.type(version) ~= "integer" then
    error("migrate.force: version must be an integer (or nil for none)", 2)
  end
  local tr = tracking(db, opts)
  ensure_table(db, tr)
  db:tx(function(tx) set_version(tx, tr, version, false) end)
end

---------------------------------------------------------------------------
-- ready-made steps

local STEP_FIELDS = { timeout = true, undo_timeout = true, retries = true, backoff = true,
  confirm = true, on_failure = true, description = true, when = true, idempotent = true }

local resolve = kit.resolve

local function with_db(o, ctx, fn)
  local v = resolve(o.db, ctx)
  if v ~= nil and type(v) ~= "string" and not rbe.is_secret(v) and type(v.query) == "function" then
    return fn(v)
  end
  if type(v) ~= "string" and not rbe.is_secret(v) then
    error("migrate step: db must be a URL, an rbe.secret, an rbe.pg connection or "
      .. "function(ctx) returning one", 0)
  end
  local db <close> = require("rbe.pg").connect(v)
  return fn(db)
end

-- step results travel through the journal as JSON: versions as strings
local function journaled(res)
  local out = { direction = res.direction, from = res.from and tostring(res.from) or nil,
    to = res.to and tostring(res.to) or nil, versions = {} }
  for i, a in ipairs(res.applied) do out.versions[i] = tostring(a.version) end
  return out
end

local function version_of(s) return s and math.tointeger(tonumber(s)) or 0 end

-- a step's memory across attempts: a small JSON file in the run directory
local function memo(ctx, tag)
  if not ctx.run_dir then return {}, nil end
  local json = require "rbe.json"
  local path = ctx.run_dir .. "/." .. tag .. "-" .. tostring(ctx.step or "step")
    :gsub("[^%w%-_.]+", "-") .. ".json"
  if fs.exists(path) then
    local ok, t = pcall(json.decode, fs.read(path))
    if ok and type(t) == "table" then return t, path end
  end
  return {}, path
end

local function memo_save(path, t)
  if path then fs.write(path, require("rbe.json").encode(t), { mode = "0600" }) end
end

local function step(direction, o, fname)
  if type(o) ~= "table" then error(fname .. ": options table expected", 3) end
  for k in pairs(o) do
    if not (RUN_OPTS[k] or k == "db" or k == "dir" or STEP_FIELDS[k]) then
      error(format("%s: unknown option '%s'", fname, tostring(k)), 3)
    end
  end
  if o.db == nil then error(fname .. ": db is required", 3) end
  if o.dir == nil then error(fname .. ": dir is required", 3) end
  if direction == "down" and o.to == nil and o.steps == nil then
    error(fname .. ": to (a version, or 0) or steps is required", 3)
  end
  local spec = {}
  for k in pairs(STEP_FIELDS) do spec[k] = o[k] end
  local back = direction == "down" and "up" or "down"
  local function opts(ctx)
    return { to = resolve(o.to, ctx), steps = resolve(o.steps, ctx), table = o.table,
      lock_timeout = o.lock_timeout }
  end

  spec.run = function(ctx)
    return with_db(o, ctx, function(db)
      local dir = resolve(o.dir, ctx)
      -- The first attempt records where it starts and where it goes, so a
      -- retry or an `rbe resume` after a crash aims at the same version
      -- (steps = 2 must not revert two more) and undo goes back to the
      -- real start.
      local mem, mpath = memo(ctx, "migrate")
      if not mem.target then
        local p = M.plan(db, dir, { direction = direction, to = resolve(o.to, ctx),
          steps = resolve(o.steps, ctx), table = o.table })
        mem.from, mem.target = fmt_version(p.from), fmt_version(p.to)
        memo_save(mpath, mem)
      end
      local from = mem.from ~= "none" and mem.from or nil
      local ok, res = true, nil
      if mem.target == mem.from then
        res = { direction = direction, from = version_of(from), to = version_of(from),
                applied = {} }
        if not from then res.from, res.to = nil, nil end
      else
        ok, res = rbe.try(on_conn, db, run_steps, dir, direction, { to = version_of(
          mem.target ~= "none" and mem.target or nil), table = o.table,
          lock_timeout = o.lock_timeout }, fname)
      end
      if not ok then
        -- The runner undoes completed steps only.  A step that failed
        -- half-way runs the files of what it did back to where it started
        -- (not after an interrupt, nor over a dirty table).
        local err = res
        if type(err.done) == "table" and #err.done > 0 and not err.dirty
           and err.kind ~= "cancelled" then
          local bok, bres = rbe.shield(rbe.try, on_conn, db, run_steps, dir, back,
            { to = version_of(from), table = o.table, lock_timeout = o.lock_timeout },
            fname .. " (putting back)")
          if bok then
            err.message = format("%s; the step then ran %d %s file(s) to put the database "
              .. "back at version %s", err.message, #bres.applied, back, fmt_version(bres.to))
            ctx.log("migrate: step failed; back at version %s", fmt_version(bres.to))
          else
            err.message = format("%s; putting the database back at version %s failed too: %s",
              err.message, fmt_version(from), tostring(bres.message or bres))
            err.compensation_error = bres
          end
        end
        error(err, 0)
      end
      for _, a in ipairs(res.applied) do
        ctx.log("migrate: %s %s (%.2fs)", direction, file_name(a.file), a.seconds)
      end
      ctx.log("migrate: %s now at version %s (was %s)", dir, fmt_version(res.to),
        fmt_version(from))
      local out = journaled(res)
      out.from = from
      return out
    end)
  end

  spec.undo = function(ctx)
    local res = ctx.results[ctx.step]
    if type(res) ~= "table" or res.from == res.to then return end
    with_db(o, ctx, function(db)
      local dir = resolve(o.dir, ctx)
      local back_res = on_conn(db, run_steps, dir, back, { to = version_of(res.from),
        table = o.table, lock_timeout = o.lock_timeout }, fname .. " (undo)")
      ctx.log("migrate: undo ran %d %s file(s); back at version %s", #back_res.applied,
        back, fmt_version(back_res.to))
    end)
  end

  spec.plan = function(ctx)
    return with_db(o, ctx, function(db)
      local dir = resolve(o.dir, ctx)
      local p = M.plan(db, dir, { direction = direction, to = resolve(o.to, ctx),
        steps = resolve(o.steps, ctx), table = o.table })
      if #p.files == 0 then
        return format("nothing: the database is at version %s", fmt_version(p.from))
      end
      local out = { format("would run %d %s file(s), %s, each in its own transaction:",
        #p.files, direction, direction == "down" and "newest first" or "oldest first") }
      for i, f in ipairs(p.files) do out[#out + 1] = format("  %d. %s", i, file_name(f)) end
      out[#out + 1] = format("version %s -> %s%s", fmt_version(p.from), fmt_version(p.to),
        p.dirty and " (the table is DIRTY: the run will refuse)" or "")
      out[#out + 1] = format("undo runs the %s files back to %s", back, fmt_version(p.from))
      return out
    end)
  end
  return spec
end

-- migrate.down_step{db, dir, to | steps, table, lock_timeout} -> a pb.step
-- spec; undo runs the up files of what it reverted (the schema comes
-- back; data the down files dropped does not)
function M.down_step(o) return step("down", o, "migrate.down_step") end

-- migrate.up_step{db, dir, to | steps, ...} -> a pb.step spec; undo runs
-- the down files back to where it started
function M.up_step(o) return step("up", o, "migrate.up_step") end

return M
