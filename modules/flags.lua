-- flags: turn feature flags off (or on) where apps keep them, and put
-- them back: in env files (.env: rewritten atomically, with a copy of the
-- file kept next to it), in a PostgreSQL table (feature_flags(name,
-- enabled, ...)) and in Redis (a key, a hash field, or a field of a JSON
-- document in a key).  Each setter returns the previous value, so every
-- step's undo puts exactly that back.  No I/O at require time; callers
-- pass paths, connections or URLs.
--
--   flags.get_env(path, KEY) -> value | nil
--   flags.set_env(path, KEY, value[, {backup}]) -> {key, previous, existed, changed, backup}
--   flags.unset_env(path, KEY[, {backup}]) -> the same
--   flags.restore_env(path[, {backup}]) -> backup path
--   flags.pg(db[, {table, key, value, by}]) -> store: get/set/delete   [yields]
--   flags.redis_get(r, target) / flags.redis_set(r, target, value)     [yields]
--   flags.env_step{...}, flags.pg_step{...}, flags.redis_step{...}
--
-- See docs/modules/flags.md.
local rbe = require "rbe"
local kit = require "rbe.stepkit"
local fs = require "rbe.fs"
local json = require "rbe.json"

local type, pairs, ipairs, error, tostring, setmetatable, pcall =
  type, pairs, ipairs, error, tostring, setmetatable, pcall
local format, concat = string.format, table.concat

local M = {}

M.BACKUP_SUFFIX = ".rbe-backup"

local ferror = kit.error_for("flags")

local check_fields = kit.check_fields

---------------------------------------------------------------------------
-- env files
--
-- A line is `KEY=value`, `export KEY=value`, a comment or blank.  Values
-- may be bare (an inline ` # comment` ends them), 'single-quoted' (taken
-- as is) or "double-quoted" (\n, \", \\ escapes; may span lines).

local function unescape_dq(s)
  return (s:gsub("\\(.)", function(c)
    if c == "n" then return "\n" elseif c == "r" then return "\r"
    elseif c == "t" then return "\t" end
    return c
  end))
end

-- parse text into entries {first, last (line numbers), key, value, quote,
-- prefix (indent and "export ")} plus the lines
local function parse_env(text)
  local lines = {}
  for line in (text .. (text:sub(-1) == "\n" and "" or "\n")):gmatch("([^\n]*)\n") do
    lines[#lines + 1] = line
  end
  if text == "" then lines = {} end
  local entries, i = {}, 1
  while i <= #lines do
    local line = lines[i]
    local prefix, key, rest = line:match("^(%s*export%s+)([%w_.%-]+)%s*=%s*(.*)$")
    if not key then prefix, key, rest = line:match("^(%s*)([%w_.%-]+)%s*=%s*(.*)$") end
    if key then
      local e = { first = i, last = i, key = key, prefix = prefix }
      local q = rest:sub(1, 1)
      if q == '"' or q == "'" then
        -- the closing quote may be on a later line
        local body, j = rest:sub(2), i
        local close
        while true do
          if q == "'" then close = body:find("'", 1, true)
          else
            local p = 1
            while true do
              local a = body:find('[\\"]', p)
              if not a then close = nil break end
              if body:sub(a, a) == "\\" then p = a + 2 else close = a break end
            end
          end
          if close or j >= #lines then break end
          j = j + 1
          body = body .. "\n" .. lines[j]
        end
        local raw = close and body:sub(1, close - 1) or body
        e.value = q == '"' and unescape_dq(raw) or raw
        e.quote, e.last = q, j
      else
        e.value = rest:gsub("%s+#.*$", ""):gsub("%s+$", "")
        if e.value:sub(1, 1) == "#" then e.value = "" end
      end
      entries[#entries + 1] = e
      i = e.last + 1
    else
      i = i + 1
    end
  end
  return entries, lines
end
M._parse_env = parse_env

local function format_value(v, quote)
  if quote == "'" and not v:find("'", 1, true) and not v:find("\n", 1, true) then
    return "'" .. v .. "'"
  end
  if quote == nil and v:match("^[%w_./:@%%+,=-]*$") then return v end
  return '"' .. v:gsub('[\\"\n\r]', { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n",
    ["\r"] = "\\r" }) .. '"'
end

local function as_string(v, fname)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" or t == "boolean" then return tostring(v) end
  error(fname .. ": value must be a string, number or boolean, got " .. t, 3)
end

local function check_key(key, fname)
  if type(key) ~= "string" or not key:match("^[%w_.%-]+$") then
    error(fname .. ": KEY must be a variable name ([A-Za-z0-9_.-]+), got " .. tostring(key), 3)
  end
end

local function mode_of(path)
  local st = fs.stat(path)
  return st and format("%o", st.mode) or nil
end

-- flags.get_env(path, KEY) -> the value (the last assignment wins, as
-- dotenv does), or nil
function M.get_env(path, key)
  check_key(key, "flags.get_env")
  local value
  for _, e in ipairs((parse_env(fs.read(path)))) do
    if e.key == key then value = e.value end
  end
  return value
end

-- rewrite `path` with KEY set to value (or removed when value is nil);
-- returns the result table
local function edit_env(path, key, value, opts, fname)
  opts = check_fields(opts, { backup = true }, fname, 3)
  local old = fs.read(path)
  local entries, lines = parse_env(old)
  local previous, existed = nil, false
  local drop = {}
  for _, e in ipairs(entries) do
    if e.key == key then
      previous, existed = e.value, true
      if value == nil then
        for l = e.first, e.last do drop[l] = true end
      else
        lines[e.first] = e.prefix .. key .. "=" .. format_value(value, e.quote)
        for l = e.first + 1, e.last do drop[l] = true end
      end
    end
  end
  local out = {}
  for i, l in ipairs(lines) do
    if not drop[i] then out[#out + 1] = l end
  end
  if value ~= nil and not existed then out[#out + 1] = key .. "=" .. format_value(value) end
  local new = #out > 0 and (concat(out, "\n") .. "\n") or ""
  local res = { key = key, previous = previous, existed = existed, value = value,
                changed = new ~= old, path = path }
  if not res.changed then return res end
  local backup = opts.backup
  if backup == nil then backup = path .. M.BACKUP_SUFFIX end
  if backup then
    fs.write(backup, old, { mode = mode_of(path) })
    res.backup = backup
  end
  fs.write(path, new)
  return res
end

-- flags.set_env(path, KEY, value[, {backup = path..".rbe-backup" | false}])
-- -> {key, previous, existed, value, changed, backup, path}.  The file is
-- replaced atomically (same mode); the file as it was is copied to the
-- backup path first (with the same mode).  Every assignment of KEY gets
-- the value, in its own quoting style; a missing KEY is appended.
function M.set_env(path, key, value, opts)
  check_key(key, "flags.set_env")
  return edit_env(path, key, as_string(value, "flags.set_env"), opts, "flags.set_env")
end

-- flags.unset_env(path, KEY[, {backup}]) -> the same shape; removes KEY
function M.unset_env(path, key, opts)
  check_key(key, "flags.unset_env")
  return edit_env(path, key, nil, opts, "flags.unset_env")
end

-- flags.restore_env(path[, {backup}]) -> the backup path: puts the copy
-- that set_env kept back in place (atomically)
function M.restore_env(path, opts)
  opts = check_fields(opts, { backup = true }, "flags.restore_env")
  local backup = opts.backup or (path .. M.BACKUP_SUFFIX)
  local ok, data = rbe.try(fs.read, backup)
  if not ok then
    if data.code == "ENOENT" then
      error(ferror("ENOENT", format("no backup of %s at %s: nothing to restore", path, backup)), 0)
    end
    error(data, 0)
  end
  fs.write(path, data)
  return backup
end

---------------------------------------------------------------------------
-- PostgreSQL

local Store = {}
Store.__index = Store

local function quote_ident(name) return '"' .. name:gsub('"', '""') .. '"' end

-- "schema.table" or "table" as a quoted, qualified name
local function qualified(name)
  local s, t = name:match("^([^.]+)%.([^.]+)$")
  if s then return quote_ident(s) .. "." .. quote_ident(t) end
  return quote_ident(name)
end

-- flags.pg(db[, {table = "feature_flags", key = "name", value =
-- "enabled", by = user}]) -> store.  `updated_at` and `updated_by`
-- columns, when the table has them, are set on every change.
function M.pg(db, opts)
  if db == nil or type(db.query) ~= "function" then
    error("flags.pg: an rbe.pg connection expected", 2)
  end
  opts = check_fields(opts, { table = true, key = true, value = true, by = true }, "flags.pg")
  return setmetatable({ db = db, table = opts.table or "feature_flags",
    key = opts.key or "name", value = opts.value or "enabled",
    by = opts.by or rbe.whoami().user }, Store)
end

-- the table's columns: value type, whether updated_at / updated_by exist
function Store:_columns(db)
  if self._cols then return self._cols end
  local rows = db:query([[
    select a.attname as name, format_type(a.atttypid, a.atttypmod) as type
      from pg_attribute a
     where a.attrelid = to_regclass($1) and a.attnum > 0 and not a.attisdropped]],
    qualified(self.table))
  if #rows == 0 then
    error(ferror("ENOTABLE", format("flags table %s does not exist (or has no columns)",
      self.table)), 0)
  end
  local cols = {}
  for _, r in ipairs(rows) do cols[r.name] = r.type end
  for _, c in ipairs { self.key, self.value } do
    if not cols[c] then
      error(ferror("ENOCOLUMN", format("flags table %s has no column %s", self.table, c)), 0)
    end
  end
  self._cols = cols
  return cols
end

local function plain(v)
  if v == rbe.null then return nil end
  return v
end

-- store:get(name) -> value, or nil when there is no row
function Store:get(name)
  self:_columns(self.db)
  local rows = self.db:query(format("select %s as v from %s where %s = $1",
    quote_ident(self.value), qualified(self.table), quote_ident(self.key)), name)
  if #rows == 0 then return nil end
  return plain(rows[1].v), true
end

-- store:set(name, value[, {create = true}]) -> {name, previous, existed,
-- value}: in one transaction, the old value read FOR UPDATE and the new
-- one written (a missing row is inserted, unless create = false)
function Store:set(name, value, opts)
  opts = check_fields(opts, { create = true }, "store:set")
  local cols = self:_columns(self.db)
  local t, k, v = qualified(self.table), quote_ident(self.key), quote_ident(self.value)
  local vtype = cols[self.value]
  return self.db:tx(function(tx)
    local rows = tx:query(format("select %s as v from %s where %s = $1 for update", v, t, k), name)
    local res = { name = name, value = value, existed = #rows > 0,
                  previous = #rows > 0 and plain(rows[1].v) or nil }
    local sets, args = { v .. " = $2::" .. vtype }, { name, value }
    if cols.updated_at then sets[#sets + 1] = "updated_at = now()" end
    if cols.updated_by then
      args[#args + 1] = self.by
      sets[#sets + 1] = "updated_by = $" .. #args
    end
    if res.existed then
      tx:query(format("update %s set %s where %s = $1", t, concat(sets, ", "), k),
        table.unpack(args))
    elseif opts.create == false then
      error(ferror("ENOFLAG", format("no flag %q in %s", tostring(name), self.table)), 0)
    else
      local names, vals = { k, v }, { "$1", "$2::" .. vtype }
      if cols.updated_by then names[3], vals[3] = "updated_by", "$3" end
      tx:query(format("insert into %s (%s) values (%s)", t, concat(names, ", "),
        concat(vals, ", ")), table.unpack(args))
    end
    return res
  end)
end

-- store:delete(name) -> true when a row was deleted
function Store:delete(name)
  self:_columns(self.db)
  return self.db:query(format("delete from %s where %s = $1", qualified(self.table),
    quote_ident(self.key)), name).affected > 0
end

---------------------------------------------------------------------------
-- Redis

-- KEYS[1] the key; ARGV: 1 mode (get|set|del), 2 kind (string|hash|json),
-- 3 field, 4 the new value (JSON text for json), 5 "1" to keep the TTL
-- Returns {key existed 0/1, field existed 0/1, previous (JSON text)}
M.REDIS_SCRIPT = [[
local key, mode, kind, field, value = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local exists = redis.call("EXISTS", key) == 1
local prev, had = nil, false
local doc
if kind == "hash" then
  prev = redis.call("HGET", key, field)
  had = prev ~= false
elseif kind == "string" then
  prev = redis.call("GET", key)
  had = prev ~= false
else
  doc = {}
  if exists then
    local raw = redis.call("GET", key)
    local ok, d = pcall(cjson.decode, raw)
    if not ok or type(d) ~= "table" then
      return redis.error_reply("FLAGS " .. key .. " does not hold a JSON object")
    end
    doc = d
  end
  prev = doc[field]
  had = prev ~= nil and prev ~= cjson.null
end
local out = { exists and 1 or 0, had and 1 or 0, had and cjson.encode(prev) or "" }
if mode == "get" then return out end
if kind == "hash" then
  if mode == "set" then redis.call("HSET", key, field, value)
  else redis.call("HDEL", key, field) end
elseif kind == "string" then
  if mode == "set" then redis.call("SET", key, value, "KEEPTTL")
  else redis.call("DEL", key) end
else
  if mode == "set" then doc[field] = cjson.decode(value)[1] else doc[field] = nil end
  if mode == "del" and next(doc) == nil and ARGV[5] == "drop" then
    redis.call("DEL", key)
  else
    redis.call("SET", key, cjson.encode(doc), "KEEPTTL")
  end
end
return out
]]

local function is_redis_client(v)
  return type(v) == "table" and type(v.call) == "function" and type(v.eval) == "function"
end

-- target: "key" (a string value), {key, field} (a hash field) or {key,
-- json = field} (a field of a JSON object stored in the key)
local function redis_target(t, fname)
  if type(t) == "string" then return { key = t, kind = "string" } end
  if type(t) ~= "table" or type(t.key) ~= "string" then
    error(fname .. ": target is a key, {key = k, field = f} or {key = k, json = f}", 3)
  end
  check_fields(t, { key = true, field = true, json = true }, fname, 3)
  if t.field and t.json then error(fname .. ": give field or json, not both", 3) end
  if t.field then return { key = t.key, kind = "hash", field = t.field } end
  if t.json then return { key = t.key, kind = "json", field = t.json } end
  return { key = t.key, kind = "string" }
end

local function redis_call(r, tg, mode, value, extra)
  local v = ""
  if value ~= nil then
    v = tg.kind == "json" and json.encode({ value }) or as_string(value, "flags.redis_set")
  end
  local res = r:eval(M.REDIS_SCRIPT, { tg.key }, { mode, tg.kind, tg.field or "", v,
    extra or "" })
  local out = { key = tg.key, field = tg.field, key_existed = res[1] == 1, existed = res[2] == 1 }
  if out.existed then
    out.previous = json.decode(res[3])
  end
  return out
end

-- flags.redis_get(r, target) -> value, or nil when absent
function M.redis_get(r, target)
  if not is_redis_client(r) then error("flags.redis_get: an rbe.redis client expected", 2) end
  local out = redis_call(r, redis_target(target, "flags.redis_get"), "get")
  return out.previous
end

-- flags.redis_set(r, target, value) -> {key, field, previous, existed,
-- key_existed}: one script reads the old value and writes the new one
-- (a string key keeps its TTL)
function M.redis_set(r, target, value)
  if not is_redis_client(r) then error("flags.redis_set: an rbe.redis client expected", 2) end
  if value == nil then error("flags.redis_set: value expected (flags.redis_unset removes)", 2) end
  local tg = redis_target(target, "flags.redis_set")
  local out = redis_call(r, tg, "set", value)
  out.value = value
  return out
end

-- flags.redis_unset(r, target[, {drop_empty}]) -> the same shape
function M.redis_unset(r, target, opts)
  if not is_redis_client(r) then error("flags.redis_unset: an rbe.redis client expected", 2) end
  opts = check_fields(opts, { drop_empty = true }, "flags.redis_unset")
  return redis_call(r, redis_target(target, "flags.redis_unset"), "del", nil,
    opts.drop_empty and "drop" or "")
end

---------------------------------------------------------------------------
-- ready-made steps

local STEP_FIELDS = { timeout = true, undo_timeout = true, retries = true, backoff = true,
  confirm = true, on_failure = true, description = true, when = true,
  idempotent = true }

local resolve = kit.resolve

local function base_spec(o, known, fname)
  return kit.base_spec(o, known, fname, STEP_FIELDS)
end

-- A step's memory across attempts (retries, `rbe resume` after a crash):
-- a small JSON file in the run directory holding what the FIRST attempt
-- found, so a second attempt never mistakes its own earlier write for
-- the value to put back.
local function memo(ctx, tag)
  if not ctx.run_dir then return {}, nil end
  local path = ctx.run_dir .. "/." .. tag .. "-" .. tostring(ctx.step or "step")
    :gsub("[^%w%-_.]+", "-") .. ".json"
  if fs.exists(path) then
    local ok, t = pcall(json.decode, fs.read(path))
    if ok and type(t) == "table" then return t, path end
  end
  return {}, path
end

local function memo_save(path, t)
  if path then fs.write(path, json.encode(t), { mode = "0600" }) end
end

-- {KEY = value, ...} from key/value or values, sorted by key
local function assignments(o, ctx, fname)
  local list = {}
  local values = resolve(o.values, ctx)
  if values ~= nil then
    if type(values) ~= "table" then error(fname .. ": values must be a table", 0) end
    for k, v in pairs(values) do list[#list + 1] = { key = k, value = v } end
    table.sort(list, function(a, b) return a.key < b.key end)
  else
    list[1] = { key = resolve(o.key, ctx), value = resolve(o.value, ctx) }
  end
  return list
end

local function shown(v)
  if v == nil then return "unset" end
  return format("%q", tostring(v))
end

-- flags.env_step{path, key, value | values = {K = v}, unset} -> a pb.step
-- spec.  The file as it was is copied into the run directory; undo puts
-- that copy back when the file still holds what the step wrote, and
-- otherwise sets each key back to its previous value (keeping edits made
-- since).
function M.env_step(o)
  local spec = base_spec(o, { path = true, key = true, value = true, values = true,
    unset = true }, "flags.env_step")
  if o.path == nil then error("flags.env_step: path is required", 2) end
  if o.values == nil and o.key == nil then
    error("flags.env_step: key (or values) is required", 2)
  end
  if o.values == nil and o.value == nil and not o.unset then
    error("flags.env_step: value is required (or unset = true)", 2)
  end

  local function copy_path(ctx)
    local name = tostring(ctx.step or "env"):gsub("[^%w%-_.]+", "-")
    return (ctx.run_dir or ".") .. "/env-" .. name .. ".backup"
  end

  spec.run = function(ctx)
    local path = resolve(o.path, ctx)
    local copy = copy_path(ctx)
    local mem, mpath = memo(ctx, "flags-env")
    if not mem.copied then
      fs.write(copy, fs.read(path), { mode = mode_of(path) })
      mem.copied, mem.keys = true, {}
      memo_save(mpath, mem)
    end
    mem.keys = mem.keys or {}
    local res = { path = path, copy = copy, keys = {} }
    local changed = false
    local ok, err = rbe.try(function()
      for _, a in ipairs(assignments(o, ctx, "flags.env_step")) do
        local r
        if o.unset then r = M.unset_env(path, a.key)
        else r = M.set_env(path, a.key, a.value) end
        changed = changed or r.changed
        local first = mem.keys[a.key]
        if not first then
          first = { previous = r.previous, existed = r.existed }
          mem.keys[a.key] = first
          memo_save(mpath, mem)
        end
        res.keys[#res.keys + 1] = { key = a.key, previous = first.previous,
          existed = first.existed }
        ctx.log("flags: %s in %s: %s -> %s", a.key, path, shown(first.previous),
          o.unset and "unset" or shown(a.value))
      end
    end)
    if not ok then
      -- a failed step is not undone by the runner: put the file back now
      if changed and fs.exists(copy) then
        fs.write(path, fs.read(copy))
        ctx.log("flags: step failed: %s put back as it was", path)
      end
      error(err, 0)
    end
    res.written = rbe.sha256(fs.read(path))
    return res
  end

  spec.undo = function(ctx)
    local res = ctx.results[ctx.step]
    if type(res) ~= "table" then return end
    local now = fs.read(res.path)
    if rbe.sha256(now) == res.written and fs.exists(res.copy) then
      fs.write(res.path, fs.read(res.copy))
      ctx.log("flags: %s restored from %s", res.path, res.copy)
      return
    end
    ctx.log("flags: %s changed since the step; setting its keys back one by one", res.path)
    for i = #res.keys, 1, -1 do
      local k = res.keys[i]
      if k.existed then M.set_env(res.path, k.key, k.previous)
      else M.unset_env(res.path, k.key) end
    end
  end

  spec.plan = function(ctx)
    local path = resolve(o.path, ctx)
    local out = {}
    for _, a in ipairs(assignments(o, ctx, "flags.env_step")) do
      local ok, cur = pcall(M.get_env, path, a.key)
      cur = ok and cur or nil
      out[#out + 1] = format("would set %s in %s: %s -> %s", a.key, path, shown(cur),
        o.unset and "unset" or shown(a.value))
    end
    out[#out + 1] = "undo puts the file back as it was"
    return out
  end
  return spec
end

local function with_db(o, ctx, fn)
  local v = resolve(o.db, ctx)
  if v ~= nil and type(v) ~= "string" and not rbe.is_secret(v) and type(v.query) == "function" then
    return fn(v)
  end
  if type(v) ~= "string" and not rbe.is_secret(v) then
    error("flags.pg_step: db must be a URL, an rbe.secret, an rbe.pg connection "
      .. "or function(ctx) returning one", 0)
  end
  local db <close> = require("rbe.pg").connect(v)
  return fn(db)
end

-- flags.pg_step{db, name, value, table, key_column, value_column, create}
-- -> a pb.step spec; undo writes the previous value back (or deletes the
-- row the step inserted)
function M.pg_step(o)
  local spec = base_spec(o, { db = true, name = true, value = true, table = true,
    key_column = true, value_column = true, create = true, by = true }, "flags.pg_step")
  if o.db == nil then error("flags.pg_step: db is required", 2) end
  if o.name == nil then error("flags.pg_step: name is required", 2) end
  if o.value == nil then error("flags.pg_step: value is required", 2) end
  local function store(db, ctx)
    return M.pg(db, { table = o.table, key = o.key_column, value = o.value_column,
      by = resolve(o.by, ctx) })
  end
  spec.run = function(ctx)
    return with_db(o, ctx, function(db)
      local name, value = resolve(o.name, ctx), resolve(o.value, ctx)
      local mem, mpath = memo(ctx, "flags-pg")
      local res = store(db, ctx):set(name, value, { create = o.create })
      if mem.set then
        res.previous, res.existed = mem.previous, mem.existed
      else
        memo_save(mpath, { set = true, previous = res.previous, existed = res.existed })
      end
      ctx.log("flags: %s.%s: %s -> %s", o.table or "feature_flags", name,
        shown(res.previous), shown(value))
      return res
    end)
  end
  spec.undo = function(ctx)
    local res = ctx.results[ctx.step]
    if type(res) ~= "table" then return end
    with_db(o, ctx, function(db)
      local s = store(db, ctx)
      if res.existed then
        s:set(res.name, res.previous)
        ctx.log("flags: %s back to %s", res.name, shown(res.previous))
      else
        s:delete(res.name)
        ctx.log("flags: %s removed (the step created it)", res.name)
      end
    end)
  end
  spec.plan = function(ctx)
    return with_db(o, ctx, function(db)
      local name, value = resolve(o.name, ctx), resolve(o.value, ctx)
      local cur, found = store(db, ctx):get(name)
      return format("would set %s.%s: %s -> %s; undo sets it back",
        o.table or "feature_flags", name, found and shown(cur) or "no row", shown(value))
    end)
  end
  return spec
end

local function with_redis(o, ctx, fn)
  local v = resolve(o.redis, ctx)
  if is_redis_client(v) then return fn(v) end
  if type(v) ~= "string" and not rbe.is_secret(v) then
    error("flags.redis_step: redis must be a URL, an rbe.secret, an rbe.redis client "
      .. "or function(ctx) returning one", 0)
  end
  local r <close> = require("rbe.redis").connect(v)
  return fn(r)
end

-- flags.redis_step{redis, key, field | json, value} -> a pb.step spec;
-- undo writes the previous value back (or removes what the step created)
function M.redis_step(o)
  local spec = base_spec(o, { redis = true, key = true, field = true, json = true,
    value = true }, "flags.redis_step")
  if o.redis == nil then error("flags.redis_step: redis is required", 2) end
  if o.key == nil then error("flags.redis_step: key is required", 2) end
  if o.value == nil then error("flags.redis_step: value is required", 2) end
  local function target(ctx)
    return { key = resolve(o.key, ctx), field = resolve(o.field, ctx),
      json = resolve(o.json, ctx) }
  end
  local function where(t)
    return t.key .. (t.field and ("[" .. t.field .. "]") or "")
      .. (t.json and ("." .. t.json) or "")
  end
  spec.run = function(ctx)
    return with_redis(o, ctx, function(r)
      local t = target(ctx)
      local mem, mpath = memo(ctx, "flags-redis")
      local res = M.redis_set(r, t, resolve(o.value, ctx))
      if mem.set then
        res.previous, res.existed, res.key_existed = mem.previous, mem.existed, mem.key_existed
      else
        memo_save(mpath, { set = true, previous = res.previous, existed = res.existed,
          key_existed = res.key_existed })
      end
      ctx.log("flags: %s: %s -> %s", where(t), shown(res.previous), shown(res.value))
      return res
    end)
  end
  spec.undo = function(ctx)
    local res = ctx.results[ctx.step]
    if type(res) ~= "table" then return end
    with_redis(o, ctx, function(r)
      local t = target(ctx)
      if res.existed then
        M.redis_set(r, t, res.previous)
      else
        M.redis_unset(r, t, { drop_empty = not res.key_existed })
      end
      ctx.log("flags: %s back to %s", where(t), shown(res.previous))
    end)
  end
  spec.plan = function(ctx)
    return with_redis(o, ctx, function(r)
      local t = target(ctx)
      return format("would set %s: %s -> %s; undo sets it back", where(t),
        shown(M.redis_get(r, t)), shown(resolve(o.value, ctx)))
    end)
  end
  return spec
end

return M
