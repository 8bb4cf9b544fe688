-- rbe.json: JSON for playbooks and modules.  It is lua-cjson (linked into
-- rbe, `require "cjson"`) plus what Debian's cjson 2.1.0 lacks:
--
--   json.array(t)      mark t (default a new table) as a JSON array, so an
--                      empty one encodes as [] instead of {}
--   json.is_array(t)   true for marked tables
--   json.encode(v)     cjson.encode honouring the marker; rbe.null and
--                      cjson.null encode as null; rbe.secret values are
--                      revealed (the caller is sending them somewhere);
--                      integers are written exactly (cjson alone prints
--                      14 significant digits: 2^53 would come out rounded)
--   json.decode(s)     cjson.decode; whole numbers come back as Lua
--                      integers (cjson gives floats: "/items/" .. id would
--                      read "/items/7.0"); empty arrays come back marked,
--                      so a document read, changed and written back keeps
--                      its []
--   json.null          cjson.null (what decode gives for null)
--
-- encode/decode failures raise error objects of kind "json" (code
-- "EINVAL" for a value that cannot be encoded, "EBADMSG" for bad input).
--
-- The marker is a metatable.  encode walks the value once; a marked empty
-- table (or a large integer) is swapped, in a copy, never in the caller's
-- table, for a unique placeholder string that is replaced by [] (or the
-- integer's digits) in cjson's output.  decode walks the result once to
-- turn whole floats into integers, and rewrites empty arrays of the text
-- to placeholders first when the text has any.  rbe.json uses its own
-- cjson instance (cjson.new()), so its settings never leak to `cjson`.
local cjson = require "cjson"
local aux = require "rbe.aux"

local type, pairs, next, error, pcall, getmetatable, setmetatable, tostring =
  type, pairs, next, error, pcall, getmetatable, setmetatable, tostring
local find, sub, byte, gsub, format = string.find, string.sub, string.byte,
  string.gsub, string.format
local concat = table.concat
local floor = math.floor
local cj = cjson.new()
local cjson_encode, cjson_decode = cj.encode, cj.decode
local mtype, tointeger = math.type, math.tointeger
local CNULL, RNULL = cjson.null, aux.null
local reveal, is_secret = aux.reveal, aux.is_secret

local M = {}

M.null = CNULL
M._VERSION = cjson._VERSION

-- __jsontype is what rbe.pg's JSON encoder reads: one marker for both
local ARRAY = { __name = "rbe.json.array", __jsontype = "array" }
M._array_mt = ARRAY

-- a placeholder nobody sends by accident: letters and digits only, so
-- cjson writes it unescaped
local EMPTY = format("rbe0empty0array0%x0%x", os.time(), math.random(1 << 30))
local EMPTY_Q = '"' .. EMPTY .. '"'
local INT_Q = '"' .. EMPTY .. 'i(%-?%d+)"'
local BIG = 1e14        -- cjson's %.14g is exact below this
local EXACT = 2^53      -- floats are exact integers below this
local MAX_DEPTH = 1000

local function json_error(code, fmt, ...)
  local e = aux.error("json", format(fmt, ...))
  e.code = code
  return e
end

-- json.array([t]) -> t marked as an array
function M.array(t)
  if t == nil then t = {} end
  if type(t) ~= "table" then
    error("json.array: table expected, got " .. type(t), 2)
  end
  local mt = getmetatable(t)
  if mt ~= nil and mt ~= ARRAY then
    error("json.array: the table already has a metatable", 2)
  end
  return setmetatable(t, ARRAY)
end

-- json.is_array(v) -> boolean
function M.is_array(v)
  return type(v) == "table" and getmetatable(v) == ARRAY
end

-- Return v ready for cjson: the same value when nothing inside needs
-- changing, else a copy.  `state.empty` counts placeholders written.
local prep
local function prep_table(t, state, depth)
  if depth > MAX_DEPTH then
    error(json_error("EINVAL", "json.encode: nesting deeper than %d "
      .. "(a table that contains itself?)", MAX_DEPTH), 0)
  end
  if getmetatable(t) == ARRAY and next(t) == nil then
    state.empty = state.empty + 1
    return EMPTY
  end
  local copy
  for k, v in pairs(t) do
    local nv = prep(v, state, depth + 1)
    if nv ~= v then
      if not copy then
        copy = {}
        for k2, v2 in pairs(t) do copy[k2] = v2 end
      end
      copy[k] = nv
    end
  end
  return copy or t
end

prep = function(v, state, depth)
  local tv = type(v)
  if tv == "table" then return prep_table(v, state, depth) end
  if tv == "number" then
    if (v >= BIG or v <= -BIG) and tointeger(v) then
      state.ints = state.ints + 1
      return EMPTY .. "i" .. format("%d", tointeger(v))
    end
    return v
  end
  if tv == "userdata" then
    if v == RNULL then return CNULL end
    if is_secret(v) then return prep(reveal(v), state, depth) end
  end
  return v
end

-- json.encode(v) -> string
function M.encode(v)
  local state = { empty = 0, ints = 0 }
  local ok, out = pcall(prep, v, state, 1)
  if not ok then error(out, 2) end
  ok, out = pcall(cjson_encode, out)
  if not ok then
    error(json_error("EINVAL", "json.encode: %s", tostring(out)), 2)
  end
  if state.empty > 0 then out = gsub(out, EMPTY_Q, "[]") end
  if state.ints > 0 then out = gsub(out, INT_Q, "%1") end
  return out
end

-- Rewrite every empty array of the JSON text s (outside strings) as
-- ["<placeholder>"]; nil when there is none.
local function mark_empty_arrays(s)
  if not find(s, "%[%s*%]") then return nil end
  local parts, n, last, pos = {}, 0, 1, 1
  while true do
    local i = find(s, '[%["]', pos)
    if not i then break end
    if byte(s, i) == 34 then          -- a string: skip to its closing quote
      local j = i + 1
      while true do
        local k = find(s, '["\\]', j)
        if not k then return nil end   -- unterminated: cjson will say so
        if byte(s, k) == 92 then j = k + 2 else pos = k + 1; break end
      end
    else
      local _, e = find(s, "^%s*%]", i + 1)
      if e then
        parts[n + 1] = sub(s, last, i)
        parts[n + 2] = EMPTY_Q
        n = n + 2
        last = e
        pos = e + 1
      else
        pos = i + 1
      end
    end
  end
  if n == 0 then return nil end
  parts[n + 1] = sub(s, last)
  return concat(parts)
end

-- whole floats -> integers; placeholder arrays -> marked empty arrays
local function fix(v)
  local tv = type(v)
  if tv == "number" then
    if v == floor(v) and v < EXACT and v > -EXACT then return tointeger(v) end
    return v
  end
  if tv ~= "table" then return v end
  if v[1] == EMPTY and next(v, 1) == nil then
    return setmetatable({}, ARRAY)
  end
  for k, x in pairs(v) do
    local tx = type(x)
    if tx == "number" then
      if x == floor(x) and x < EXACT and x > -EXACT then v[k] = tointeger(x) end
    elseif tx == "table" then
      v[k] = fix(x)
    end
  end
  return v
end

-- json.decode(s) -> value
function M.decode(s)
  if type(s) ~= "string" then
    error("json.decode: string expected, got " .. type(s), 2)
  end
  local marked = mark_empty_arrays(s)
  local ok, v = pcall(cjson_decode, marked or s)
  if not ok then
    -- report positions in the caller's text, not in the rewritten one
    if marked then ok, v = pcall(cjson_decode, s) end
    if not ok then
      error(json_error("EBADMSG", "json.decode: %s", tostring(v)), 2)
    end
  end
  return fix(v)
end

return M
