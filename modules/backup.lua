-- backup: pg_dump and pg_restore for rollbacks.  Dumps get timestamped
-- names and are written under a temporary name, renamed only when pg_dump
-- succeeded; old ones are pruned (keep = N); verify lists a dump's table
-- of contents; restore runs pg_restore --clean --if-exists
-- --single-transaction after terminating the other sessions of the
-- database; export_table saves rows as CSV through COPY (data written
-- since the deploy, before a destructive rollback).  The password is
-- taken out of the URL and handed to the tools in PGPASSWORD, never in
-- argv (where `ps` would show it); they always run with --no-password.
-- The client binaries come from /usr/lib/postgresql/<server major>/bin
-- (Debian's layout) unless `bindir` says otherwise.
--
--   backup.dump(url, {dir, format, name, keep, ...}) -> {path, bytes, seconds}  [yields]
--   backup.verify(path[, opts]) -> {entries, tables, database, ...}             [yields]
--   backup.restore(url, path[, {clean, single_transaction, terminate}])         [yields]
--   backup.terminate_connections(db, dbname[, opts]) -> n                       [yields]
--   backup.export_table(db, table, path[, {where}]) -> {rows, bytes, path}      [yields]
--   backup.import_table(db, table, path) -> {rows, bytes, path}                 [yields]
--   backup.list(dir[, {name}]) -> dumps, newest first
--   backup.dump_step{...}, backup.restore_step{...}, backup.export_step{...}
--
-- See docs/modules/backup.md.
local rbe = require "rbe"
local kit = require "rbe.stepkit"
local fs = require "rbe.fs"
local proc = require "rbe.proc"

local type, pairs, ipairs, error, tostring, tonumber, pcall =
  type, pairs, ipairs, error, tostring, tonumber, pcall
local format, concat = string.format, table.concat

local M = {}

M.EXT = { custom = ".dump", plain = ".sql", tar = ".tar", directory = ".dir" }
local FORMAT_FLAG = { custom = "c", plain = "p", tar = "t", directory = "d" }

local berror = kit.error_for("backup")

local check_fields = kit.check_fields

local function mask(s)
  return (tostring(s):gsub("(%a[%w+.-]*://[^/:@%s]*):[^@/%s]+@", "%1:***@")
    :gsub("(password%s*=%s*)'[^']*'", "%1***"):gsub("(password%s*=%s*)[^%s']+", "%1***"))
end
M._mask = mask

local function quote_ident(name) return '"' .. name:gsub('"', '""') .. '"' end

-- "schema.table" or "table", quoted
local function qualified(name)
  if type(name) ~= "string" or name == "" then error("backup: table name expected", 3) end
  local s, t = name:match("^([^.]+)%.([^.]+)$")
  if s then return quote_ident(s) .. "." .. quote_ident(t) end
  return quote_ident(name)
end

---------------------------------------------------------------------------
-- connection strings: the password goes to PGPASSWORD

local function pct_decode(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- split(url_or_conninfo) -> target without the password, password, dbname
local function split_target(target, fname)
  if rbe.is_secret(target) then target = rbe.reveal(target) end
  if type(target) ~= "string" or target == "" then
    error(fname .. ": a postgresql:// URL or a libpq connection string expected", 3)
  end
  local password, dbname
  if target:match("^postgres[%w]*://") then
    local scheme, rest = target:match("^(postgres[%w]*://)(.*)$")
    local auth, hostpart = rest:match("^([^@/]*)@(.*)$")
    if auth then
      local user, pw = auth:match("^([^:]*):(.*)$")
      if user then
        password = pct_decode(pw)
        auth = user
      end
      rest = auth .. "@" .. hostpart
    end
    -- ?password=... too
    local base, query = rest:match("^([^?]*)%?(.*)$")
    if query then
      local kept = {}
      for kv in query:gmatch("[^&]+") do
        local k, v = kv:match("^([^=]*)=(.*)$")
        if k == "password" then password = pct_decode(v)
        else
          kept[#kept + 1] = kv
          if k == "dbname" then dbname = pct_decode(v) end
        end
      end
      rest = base .. (#kept > 0 and ("?" .. concat(kept, "&")) or "")
    end
    target = scheme .. rest
    local path = (base or rest):match("^[^/]*/([^?]*)")
    if path and path ~= "" then dbname = dbname or pct_decode(path) end
  else
    local out = {}
    local i, n = 1, #target
    while i <= n do
      local k, e = target:match("^%s*([%w_]+)%s*=%s*()", i)
      if not k then break end
      local v
      if target:sub(e, e) == "'" then
        local j, buf = e + 1, {}
        while j <= n do
          local c = target:sub(j, j)
          if c == "\\" then buf[#buf + 1] = target:sub(j + 1, j + 1); j = j + 2
          elseif c == "'" then j = j + 1 break
          else buf[#buf + 1] = c; j = j + 1 end
        end
        v, i = concat(buf), j
      else
        local s, f = target:match("^([^%s]*)()", e)
        v, i = s, f
      end
      if k == "password" then password = v
      else
        out[#out + 1] = k .. "='" .. v:gsub("\\", "\\\\"):gsub("'", "\\'") .. "'"
        if k == "dbname" then dbname = v end
      end
    end
    target = concat(out, " ")
  end
  return target, password, dbname
end
M._split_target = split_target

local function tool_env(password)
  if password then return { PGPASSWORD = rbe.secret(password) } end
  return nil
end

---------------------------------------------------------------------------
-- the binaries

local function major_of(dir) return tonumber(dir:match("/postgresql/(%d+)/bin$")) end

local function debian_bindirs()
  local out = {}
  local ok, names = pcall(fs.list, "/usr/lib/postgresql")
  if not ok then return out end
  for _, v in ipairs(names) do
    local d = "/usr/lib/postgresql/" .. v .. "/bin"
    if tonumber(v) and fs.exists(d .. "/pg_dump") then out[#out + 1] = d end
  end
  table.sort(out, function(a, b) return major_of(a) < major_of(b) end)
  return out
end

-- the directory of the client binaries for a server of this major: the
-- same major, else the newest installed (pg_dump reads older servers, not
-- newer ones), else nil (PATH)
local function pick_bindir(major)
  local dirs = debian_bindirs()
  for _, d in ipairs(dirs) do
    if major and major_of(d) == major then return d end
  end
  return dirs[#dirs]
end

local function tool(bindir, name)
  return bindir and (bindir .. "/" .. name) or name
end

-- the server's major version (one short connection)
local function server_major(target, password)
  local pg = require "rbe.pg"
  local db <close> = pg.connect(target, password and { password = password } or nil)
  return math.tointeger(db:query("show server_version_num")[1].server_version_num // 10000),
    db:query("select current_database() as d")[1].d
end

local function run_tool(argv, env, timeout, what)
  local ok, res = rbe.try(proc.run, argv, { env = env, timeout = timeout, check = false })
  if not ok then
    if res.kind == "timeout" or res.kind == "cancelled" then error(res, 0) end
    error(berror(res.code or "ENOENT", format("%s: %s", what, mask(res.message or res))), 0)
  end
  if res.code ~= 0 then
    local tail = mask(res.stderr or ""):gsub("%s+$", "")
    if #tail > 2000 then tail = "..." .. tail:sub(-2000) end
    error(berror(res.code, format("%s failed (exit %d): %s", what, res.code, tail),
      { stderr = mask(res.stderr or "") }), 0)
  end
  return res
end

---------------------------------------------------------------------------
-- dump

local function stamp()
  local t = rbe.time()
  local ms = math.floor((t % 1) * 1000)
  return os.date("!%Y%m%dT%H%M%S", math.floor(t)) .. format("%03dZ", ms)
end

-- escape a name for a Lua pattern
local function pesc(s) return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")) end

-- backup.list(dir[, {name}]) -> {{path, name, stamp, format, bytes}},
-- newest first: the dumps this module wrote (NAME-STAMP.EXT)
function M.list(dir, opts)
  opts = check_fields(opts, { name = true }, "backup.list")
  local out = {}
  local ok, names = pcall(fs.list, dir)
  if not ok then return out end
  local pat = "^(" .. (opts.name and pesc(opts.name) or ".+") .. ")%-("
    .. ("%d"):rep(8) .. "T" .. ("%d"):rep(9) .. "Z)(%.%a+)$"
  for _, f in ipairs(names) do
    local name, st, ext = f:match(pat)
    local fmt
    for k, e in pairs(M.EXT) do if e == ext then fmt = k end end
    if name and fmt then
      local s = fs.stat(dir .. "/" .. f)
      out[#out + 1] = { path = dir .. "/" .. f, name = name, stamp = st, format = fmt,
        bytes = s and s.size or 0 }
    end
  end
  table.sort(out, function(a, b) return a.stamp > b.stamp end)
  return out
end

local DUMP_OPTS = { dir = true, format = true, name = true, keep = true, bindir = true,
  clean = true, timeout = true, jobs = true, schema_only = true, data_only = true, tables = true,
  exclude_tables = true, args = true, verify = true }

-- backup.dump(url, {dir, format = "custom", name = dbname, keep, bindir,
-- timeout = "1h", jobs, schema_only, data_only, tables, exclude_tables,
-- clean = true (plain: DROP ... IF EXISTS before each object), args,
-- verify}) -> {path, bytes, seconds, format, database, name, bindir,
-- removed, toc}
function M.dump(url, opts)
  opts = check_fields(opts, DUMP_OPTS, "backup.dump")
  local target, password, dbname = split_target(url, "backup.dump")
  local dir = opts.dir
  if type(dir) ~= "string" or dir == "" then error("backup.dump: dir is required", 2) end
  local fmt = opts.format or "custom"
  if not M.EXT[fmt] then
    error("backup.dump: format must be custom, plain, tar or directory", 2)
  end
  local bindir = opts.bindir
  if not bindir then
    local major, db = server_major(target, password)
    bindir = pick_bindir(major)
    dbname = dbname or db
  end
  local name = opts.name or dbname
  if type(name) ~= "string" or name == "" or name:find("/", 1, true) then
    error("backup.dump: name (a file name prefix) is required when the URL names no database", 2)
  end
  fs.mkdir(dir, { mode = "0700" })
  local final = dir .. "/" .. name .. "-" .. stamp() .. M.EXT[fmt]
  while fs.exists(final) do final = dir .. "/" .. name .. "-" .. stamp() .. M.EXT[fmt] end
  local part = dir .. "/." .. final:match("[^/]*$") .. ".part"
  local argv = { tool(bindir, "pg_dump"), "--no-password", "-F", FORMAT_FLAG[fmt], "-f", part }
  if opts.jobs then
    if fmt ~= "directory" then error("backup.dump: jobs needs format = \"directory\"", 2) end
    argv[#argv + 1] = "-j"; argv[#argv + 1] = tostring(opts.jobs)
  end
  if fmt == "plain" and opts.clean ~= false then
    -- a plain script restores over an existing database only if it
    -- drops what it creates (the other formats do that at restore time)
    argv[#argv + 1] = "--clean"
    argv[#argv + 1] = "--if-exists"
  end
  if opts.schema_only then argv[#argv + 1] = "--schema-only" end
  if opts.data_only then argv[#argv + 1] = "--data-only" end
  for _, t in ipairs(opts.tables or {}) do argv[#argv + 1] = "--table=" .. t end
  for _, t in ipairs(opts.exclude_tables or {}) do argv[#argv + 1] = "--exclude-table=" .. t end
  for _, a in ipairs(opts.args or {}) do argv[#argv + 1] = a end
  argv[#argv + 1] = "-d"
  argv[#argv + 1] = target
  local t0 = rbe.now()
  local ok, err = rbe.try(run_tool, argv, tool_env(password), opts.timeout or "1h",
    "pg_dump " .. mask(target))
  if not ok then
    fs.remove(part, { recursive = true, missing_ok = true })
    error(err, 0)
  end
  local renamed, why = os.rename(part, final)
  if not renamed then
    fs.remove(part, { recursive = true, missing_ok = true })
    error(berror("EIO", format("cannot rename %s to %s: %s", part, final, tostring(why))), 0)
  end
  local bytes = 0
  if fmt == "directory" then
    for _, f in ipairs(fs.list(final)) do bytes = bytes + fs.stat(final .. "/" .. f).size end
  else
    bytes = fs.stat(final).size
  end
  local res = { path = final, bytes = bytes, seconds = rbe.now() - t0, format = fmt,
    database = dbname, name = name, bindir = bindir, removed = {} }
  if opts.verify then res.toc = M.verify(final, { bindir = bindir }) end
  if opts.keep then
    if math.type(opts.keep) ~= "integer" or opts.keep < 1 then
      error("backup.dump: keep must be a positive integer", 2)
    end
    local all = M.list(dir, { name = name })
    for i = opts.keep + 1, #all do
      fs.remove(all[i].path, { recursive = true, missing_ok = true })
      res.removed[#res.removed + 1] = all[i].path
    end
  end
  return res
end

---------------------------------------------------------------------------
-- verify

-- backup.verify(path[, {bindir}]) -> {path, format, entries, tables,
-- database, server_version, dumped_at}: pg_restore --list (a plain SQL
-- dump: its header and the "dump complete" line); raises backup/EBADDUMP
function M.verify(path, opts)
  opts = check_fields(opts, { bindir = true, timeout = true }, "backup.verify")
  local st = fs.stat(path)
  if not st then error(berror("ENOENT", "no dump at " .. path), 0) end
  if st.type == "file" then
    local f <close> = io.open(path, "rb")
    local head = f and f:read(4096) or ""
    if head:sub(1, 5) ~= "PGDMP" and not path:match("%.tar$") then
      -- plain SQL: the header, and the "dump complete" line near the end
      -- (read from the file's two ends, never whole)
      if not head:find("^%-%- *\n%-%- PostgreSQL database dump") then
        error(berror("EBADDUMP", path .. " is not a pg_dump file"), 0)
      end
      f:seek("set", math.max(0, st.size - 2048))
      local tail = f:read(2048) or ""
      if not tail:find("\n%-%- PostgreSQL database dump complete\n") then
        error(berror("EBADDUMP", path
          .. " is a truncated plain dump (no \"dump complete\" line)"), 0)
      end
      return { path = path, format = "plain", entries = nil,
        server_version = head:match("Dumped from database version ([^\n]+)") }
    end
  end
  local bindir = opts.bindir or pick_bindir(nil)
  local ok, res = rbe.try(run_tool, { tool(bindir, "pg_restore"), "--list", path }, nil,
    opts.timeout or "10m", "pg_restore --list " .. path)
  if not ok then
    if res.kind == "backup" then
      res.code = "EBADDUMP"
      res.message = path .. " is not a readable dump: " .. res.message
    end
    error(res, 0)
  end
  local out = { path = path, entries = 0, tables = 0 }
  for line in res.stdout:gmatch("[^\n]+") do
    if line:sub(1, 1) == ";" then
      out.database = out.database or line:match("^;%s+dbname: (.+)$")
      out.server_version = out.server_version
        or line:match("^;%s+Dumped from database version: (.+)$")
      out.dumped_at = out.dumped_at or line:match("^;%s+Archive created at (.+)$")
      out.format = out.format or (line:match("^;%s+Format: (%u+)") or ""):lower()
      if out.format == "" then out.format = nil end
    else
      out.entries = out.entries + 1
      if line:find(" TABLE DATA ", 1, true) then out.tables = out.tables + 1 end
    end
  end
  if out.entries == 0 then
    error(berror("EBADDUMP", path .. " has an empty table of contents"), 0)
  end
  return out
end

---------------------------------------------------------------------------
-- sessions, restore

-- backup.terminate_connections(db, dbname[, {wait = "5s"}]) -> how many
-- sessions were terminated (pg_terminate_backend of every other session
-- on dbname); waits until they are gone
function M.terminate_connections(db, dbname, opts)
  if db == nil or type(db) == "string" or type(db.query) ~= "function" then
    error("backup.terminate_connections: an rbe.pg connection expected", 2)
  end
  if type(dbname) ~= "string" then
    error("backup.terminate_connections: database name expected", 2)
  end
  opts = check_fields(opts, { wait = true }, "backup.terminate_connections")
  local rows = db:query([[
    select pg_terminate_backend(pid) as ok from pg_stat_activity
     where datname = $1 and pid <> pg_backend_pid()]], dbname)
  local n = 0
  for _, r in ipairs(rows) do if r.ok then n = n + 1 end end
  local deadline = rbe.now() + rbe.duration(opts.wait or "5s")
  while true do
    local left = db:query("select count(*) as n from pg_stat_activity where datname = $1 "
      .. "and pid <> pg_backend_pid()", dbname)[1].n
    if left == 0 then break end
    if rbe.now() >= deadline then
      error(berror("EBUSY", format("%d session(s) on %s are still there after "
        .. "pg_terminate_backend", left, dbname), { retryable = true }), 0)
    end
    rbe.sleep(0.05)
  end
  return n
end

local RESTORE_OPTS = { clean = true, single_transaction = true, if_exists = true,
  no_owner = true, jobs = true, bindir = true, timeout = true, terminate = true,
  exit_on_error = true, args = true }

-- backup.restore(url, path[, {clean = true, single_transaction = true,
-- terminate = false | true | admin URL, no_owner, jobs, bindir, timeout,
-- args}]) -> {path, seconds, terminated}
function M.restore(url, path, opts)
  opts = check_fields(opts, RESTORE_OPTS, "backup.restore")
  local target, password, dbname = split_target(url, "backup.restore")
  if type(path) ~= "string" then error("backup.restore: dump path expected", 2) end
  local st = fs.stat(path)
  if not st then error(berror("ENOENT", "no dump at " .. path), 0) end
  local bindir = opts.bindir
  if not bindir or opts.terminate then
    local major, db = server_major(target, password)
    bindir = bindir or pick_bindir(major)
    dbname = dbname or db
  end
  local res = { path = path, terminated = 0 }
  if opts.terminate then
    local pg = require "rbe.pg"
    local admin
    if opts.terminate == true then
      admin = pg.connect(target, password and { password = password } or nil)
    else
      admin = pg.connect(opts.terminate)
    end
    local ok, n = rbe.try(M.terminate_connections, admin, dbname)
    admin:close()
    if not ok then error(n, 0) end
    res.terminated = n
  end
  local single = opts.single_transaction ~= false and not opts.jobs
  local argv
  local plain = st.type == "file" and not path:match("%.tar$")
  if plain then
    local f <close> = io.open(path, "rb")
    plain = (f and f:read(5) or "") ~= "PGDMP"
  end
  if plain then
    argv = { tool(bindir, "psql"), "--no-password", "-X", "-q", "-v", "ON_ERROR_STOP=1" }
    if single then argv[#argv + 1] = "--single-transaction" end
    argv[#argv + 1] = "-f"; argv[#argv + 1] = path
    argv[#argv + 1] = "-d"; argv[#argv + 1] = target
  else
    argv = { tool(bindir, "pg_restore"), "--no-password" }
    if opts.clean ~= false then
      argv[#argv + 1] = "--clean"
      if opts.if_exists ~= false then argv[#argv + 1] = "--if-exists" end
    end
    if single then argv[#argv + 1] = "--single-transaction" end
    if opts.exit_on_error ~= false then argv[#argv + 1] = "--exit-on-error" end
    if opts.no_owner then argv[#argv + 1] = "--no-owner" end
    if opts.jobs then argv[#argv + 1] = "-j"; argv[#argv + 1] = tostring(opts.jobs) end
    for _, a in ipairs(opts.args or {}) do argv[#argv + 1] = a end
    argv[#argv + 1] = "-d"; argv[#argv + 1] = target
    argv[#argv + 1] = path
  end
  local t0 = rbe.now()
  run_tool(argv, tool_env(password), opts.timeout or "1h",
    (plain and "psql -f " or "pg_restore ") .. path .. " into " .. mask(target))
  res.seconds = rbe.now() - t0
  return res
end

---------------------------------------------------------------------------
-- tables as CSV

-- backup.export_table(db, table, path[, {where, columns, header = true}])
-- -> {rows, bytes, path}: COPY (SELECT ...) TO STDOUT as CSV; the file
-- appears only when the COPY succeeded
function M.export_table(db, tbl, path, opts)
  if db == nil or type(db) == "string" or type(db.copy_out) ~= "function" then
    error("backup.export_table: an rbe.pg connection expected", 2)
  end
  opts = check_fields(opts, { where = true, columns = true, header = true }, "backup.export_table")
  local cols = "*"
  if opts.columns then
    local q = {}
    for i, c in ipairs(opts.columns) do q[i] = quote_ident(c) end
    cols = concat(q, ", ")
  end
  local sql = format("copy (select %s from %s%s) to stdout with (format csv%s)", cols,
    qualified(tbl), opts.where and (" where " .. opts.where) or "",
    opts.header == false and "" or ", header")
  return db:copy_out(sql, path)
end

-- backup.import_table(db, table, path[, {columns, header = true}]) ->
-- {rows, bytes, path}: the reverse, COPY ... FROM STDIN
function M.import_table(db, tbl, path, opts)
  if db == nil or type(db) == "string" or type(db.copy_in) ~= "function" then
    error("backup.import_table: an rbe.pg connection expected", 2)
  end
  opts = check_fields(opts, { columns = true, header = true }, "backup.import_table")
  local cols = ""
  if opts.columns then
    local q = {}
    for i, c in ipairs(opts.columns) do q[i] = quote_ident(c) end
    cols = " (" .. concat(q, ", ") .. ")"
  end
  return db:copy_in(format("copy %s%s from stdin with (format csv%s)", qualified(tbl), cols,
    opts.header == false and "" or ", header"), path)
end

---------------------------------------------------------------------------
-- ready-made steps

local STEP_FIELDS = { timeout = true, undo_timeout = true, retries = true, backoff = true,
  confirm = true, on_failure = true, description = true, when = true, idempotent = true }

local resolve = kit.resolve

local function base_spec(o, known, fname)
  return kit.base_spec(o, known, fname, STEP_FIELDS)
end

local function human_bytes(n)
  if n >= 1024 * 1024 * 1024 then return format("%.1f GiB", n / 1024 ^ 3) end
  if n >= 1024 * 1024 then return format("%.1f MiB", n / 1024 ^ 2) end
  if n >= 1024 then return format("%.1f KiB", n / 1024) end
  return format("%d bytes", n)
end
M._human_bytes = human_bytes

local function db_size(url)
  local target, password = split_target(url, "backup")
  local pg = require "rbe.pg"
  local db <close> = pg.connect(target, password and { password = password } or nil)
  local r = db:query("select current_database() as d, pg_database_size(current_database()) as n")[1]
  return r.d, r.n
end

-- backup.dump_step{url, dir = run dir, format, name, keep, verify = true,
-- bindir, ...} -> a pb.step spec.  No undo: a dump changes nothing.
function M.dump_step(o)
  local spec = base_spec(o, { url = true, dir = true, format = true, name = true, keep = true,
    verify = true, bindir = true, tables = true, exclude_tables = true, schema_only = true,
    dump_timeout = true }, "backup.dump_step")
  if o.url == nil then error("backup.dump_step: url is required", 2) end
  spec.run = function(ctx)
    local res = M.dump(resolve(o.url, ctx), { dir = resolve(o.dir, ctx) or ctx.run_dir,
      format = o.format, name = resolve(o.name, ctx), keep = o.keep,
      bindir = resolve(o.bindir, ctx),
      verify = o.verify ~= false, tables = o.tables, exclude_tables = o.exclude_tables,
      schema_only = o.schema_only, timeout = o.dump_timeout })
    ctx.log("backup: %s (%s in %.1fs%s)", res.path, human_bytes(res.bytes), res.seconds,
      res.toc and format(", %d entries, %d tables", res.toc.entries, res.toc.tables) or "")
    for _, p in ipairs(res.removed) do ctx.log("backup: removed old dump %s", p) end
    return { path = res.path, bytes = res.bytes, seconds = res.seconds, format = res.format,
      database = res.database }
  end
  spec.plan = function(ctx)
    local name, size = db_size(resolve(o.url, ctx))
    local dir = resolve(o.dir, ctx) or "the run directory"
    return format("would pg_dump %s (%s, %s format) into %s%s", name, human_bytes(size),
      o.format or "custom", dir, o.keep and format(", keeping the newest %d", o.keep) or "")
  end
  return spec
end

-- the dump a restore step restores: a path, function(ctx), or "latest"
-- (the newest in dir, optionally of name)
local function chosen_file(o, ctx)
  local f = resolve(o.file, ctx)
  if f == "latest" or f == nil then
    local dir = resolve(o.dir, ctx)
    if not dir then
      error("backup.restore_step: file (or dir with file = \"latest\") is required", 0)
    end
    local all = M.list(dir, { name = resolve(o.name, ctx) })
    if not all[1] then
      error(berror("ENOENT", format("no dump in %s%s", dir,
        o.name and (" named " .. tostring(resolve(o.name, ctx))) or "")), 0)
    end
    return all[1].path
  end
  return f
end

-- backup.restore_step{url, file | dir + name (file = "latest"),
-- safety_dump = true, terminate = true | admin URL, clean, no_owner,
-- bindir} -> a pb.step spec.  The database as it is now is dumped into
-- the run directory first; undo restores that dump.
function M.restore_step(o)
  local spec = base_spec(o, { url = true, file = true, dir = true, name = true,
    safety_dump = true, terminate = true, clean = true, no_owner = true, bindir = true,
    restore_timeout = true }, "backup.restore_step")
  if o.url == nil then error("backup.restore_step: url is required", 2) end
  local function ropts(ctx)
    return { clean = o.clean, no_owner = o.no_owner, bindir = resolve(o.bindir, ctx),
      terminate = resolve(o.terminate, ctx), timeout = o.restore_timeout }
  end
  spec.run = function(ctx)
    local url = resolve(o.url, ctx)
    local file = chosen_file(o, ctx)
    M.verify(file, { bindir = resolve(o.bindir, ctx) })
    local result = { restored = file }
    if o.safety_dump ~= false then
      local d = M.dump(url, { dir = ctx.run_dir, name = "before-restore",
        bindir = resolve(o.bindir, ctx), verify = true })
      result.safety = d.path
      ctx.log("backup: the database as it was is in %s (%s)", d.path, human_bytes(d.bytes))
    end
    local r = M.restore(url, file, ropts(ctx))
    result.terminated, result.seconds = r.terminated, r.seconds
    ctx.log("backup: restored %s in %.1fs (%d session(s) terminated)", file, r.seconds,
      r.terminated)
    return result
  end
  spec.undo = function(ctx)
    local res = ctx.results[ctx.step]
    if type(res) ~= "table" or not res.safety then
      ctx.log("backup: no safety dump: nothing to undo")
      return
    end
    M.restore(resolve(o.url, ctx), res.safety, ropts(ctx))
    ctx.log("backup: restored the safety dump %s", res.safety)
  end
  spec.plan = function(ctx)
    local url = resolve(o.url, ctx)
    local file = chosen_file(o, ctx)
    local toc = M.verify(file, { bindir = resolve(o.bindir, ctx) })
    local name = db_size(url)
    local out = { format("would restore %s (%s entries, %d tables%s) into %s with pg_restore "
      .. "--clean --if-exists --single-transaction", file, tostring(toc.entries or "?"),
      toc.tables or 0, toc.dumped_at and (", dumped " .. toc.dumped_at) or "", name) }
    if o.terminate then out[#out + 1] = "other sessions on " .. name .. " are terminated first" end
    out[#out + 1] = o.safety_dump ~= false
      and "the database as it is is dumped into the run directory first; undo restores that dump"
      or "no safety dump: no undo"
    return out
  end
  if o.safety_dump == false then spec.undo = nil end
  return spec
end

-- backup.export_step{url, tables = {"t", ...} | table, where, dir = run
-- dir} -> a pb.step spec saving the rows as CSV files (no undo)
function M.export_step(o)
  local spec = base_spec(o, { url = true, tables = true, where = true, dir = true },
    "backup.export_step")
  if o.url == nil then error("backup.export_step: url is required", 2) end
  if o.tables == nil then error("backup.export_step: tables is required", 2) end
  local function list(ctx)
    local t = resolve(o.tables, ctx)
    if type(t) == "string" then t = { t } end
    return t
  end
  local function with_db(ctx, fn)
    local target, password = split_target(resolve(o.url, ctx), "backup.export_step")
    local db <close> = require("rbe.pg").connect(target,
      password and { password = password } or nil)
    return fn(db)
  end
  spec.run = function(ctx)
    local dir = resolve(o.dir, ctx) or ctx.run_dir
    fs.mkdir(dir, { mode = "0700" })
    return with_db(ctx, function(db)
      local out = { files = {} }
      for _, t in ipairs(list(ctx)) do
        local where = resolve(o.where, ctx)
        if type(where) == "table" then where = where[t] end
        local path = dir .. "/" .. t:gsub("[^%w_.-]", "_") .. ".csv"
        local r = M.export_table(db, t, path, { where = where })
        out.files[#out.files + 1] = { table = t, path = path, rows = r.rows }
        ctx.log("backup: %d row(s) of %s saved in %s", r.rows, t, path)
      end
      return out
    end)
  end
  spec.plan = function(ctx)
    return with_db(ctx, function(db)
      local out = {}
      for _, t in ipairs(list(ctx)) do
        local where = resolve(o.where, ctx)
        if type(where) == "table" then where = where[t] end
        local n = db:query(format("select count(*) as n from %s%s", qualified(t),
          where and (" where " .. where) or ""))[1].n
        out[#out + 1] = format("would save %d row(s) of %s as CSV", n, t)
      end
      return out
    end)
  end
  return spec
end

-- backup.recreate(admin_url, url, path[, {bindir, log}]) -> {tables, terminated}
-- Replace the database of `url` with the dump at `path`, for dumps of an
-- older schema that a --clean restore cannot lay over the current one.
-- The dump is verified first (nothing is dropped for a file pg_restore
-- cannot read), the other sessions are terminated, the database is dropped
-- and created again for url's user, and the dump restored into it in one
-- transaction.  An error after the drop carries `dropped = true`.
-- `log(fmt, ...)` (e.g. ctx.log) hears what happens.
function M.recreate(admin_url, url, path, opts)
  opts = check_fields(opts, { bindir = true, log = true }, "backup.recreate")
  local log = opts.log or function() end
  if (rbe.reveal(admin_url) or "") == "" then
    error(berror("EINVAL", "a restore by recreating needs an admin (superuser) URL: "
      .. "nothing was dropped"), 0)
  end
  local pg = require "rbe.pg"
  local raw = rbe.reveal(url)
  local name = raw:match("^[^/]*//[^/]*/([^?]+)") or "postgres"
  local owner = raw:match("^[^/]*//([^@:/]+)[:@]") or "postgres"
  local toc = M.verify(path, { bindir = opts.bindir })
  local admin <close> = pg.connect(admin_url)
  local killed = M.terminate_connections(admin, name)
  log("terminated %d other session(s) on %s", killed, name)
  admin:exec("drop database if exists " .. pg.quote_ident(name) .. " with (force)")
  local ok, err = rbe.try(function()
    admin:exec(("create database %s owner %s"):format(pg.quote_ident(name), pg.quote_ident(owner)))
    local target = rbe.secret((rbe.reveal(admin_url):gsub("^([^/]*//[^/]*/)[^?]*", "%1" .. name)))
    M.restore(target, path, { clean = false, bindir = opts.bindir })
  end)
  if not ok then
    err.dropped = true
    error(err, 0)
  end
  log("%s restored from %s (%d tables)", name, path, toc.tables or 0)
  return { tables = toc.tables, terminated = killed }
end

return M
