-- rbe.json: JSON for playbooks and modules.  It is lua-cjson (linked into
-- rbe, `require "cjson"`) plus what Debian's cjson 2.1.0 lacks:
--
--   json.array(t)      mark t (default a new table) as a JSON array, so an
--                      empty one encodes as [] instead of {}
--   json.is_array(t)   true for marked tables
--   json.encode(v)     cjson.encode honouring the marker; rbe.null and
--                      cjson.null encode as null; rbe.secret values are
--                      revealed (the caller is sending them somewhere)
--   json.decode(s)     cjson.decode; empty arrays come back marked, so a
--                      document read, changed and written back keeps its []
--   json.null          cjson.null (what decode gives for null)
--
-- encode/decode failures raise error objects of kind "json" (code
-- "EINVAL" for a value that cannot be encoded, "EBADMSG" for bad input).
--
-- The marker is a metatable.  encode walks the value once; a marked empty
-- table is swapped (in a copy, never in the caller's table) for a unique
-- placeholder string that is replaced by [] in cjson's output.  decode
-- does the reverse only when the text contains an empty array at all.
local cjson = require "cjson"
local aux = require "rbe.aux"

local type, pairs, next, error, pcall, getmetatable, setmetatable, tostring =
  type, pairs, next, error, pcall, getmetatable, setmetatable, tostring
local find, sub, byte, gsub, format = string.find, string.sub, string.byte,
  string.gsub, string.format
local concat = table.concat
local cjson_encode, cjson_decode = cjson.encode, cjson.decode
local CNULL, RNULL = cjson.null, aux.null
local reveal, is_secret = aux.reveal, aux.is_secret

local M = {}

M.null = CNULL
M._VERSION = cjson._VERSION

local ARRAY = { __name = "rbe.json.array" }
M._array_mt = ARRAY

-- a placeholder nobody sends by accident: letters and digits only, so
-- cjson writes it unescaped
local EMPTY = format("rbe0empty0array0%x0%x", os.time(), math.random(1 << 30))
local EMPTY_Q = '"' .. EMPTY .. '"'
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
  if tv == "userdata" then
    if v == RNULL then return CNULL end
    if is_secret(v) then return prep(reveal(v), state, depth) end
  end
  return v
end

-- json.encode(v) -> string
function M.encode(v)
  local state = { empty = 0 }
  local ok, out = pcall(function() return cjson_encode(prep(v, state, 1)) end)
  if not ok then
    if aux.is_error(out) then error(out, 2) end
    error(json_error("EINVAL", "json.encode: %s", tostring(out)), 2)
  end
  if state.empty > 0 then out = gsub(out, EMPTY_Q, "[]") end
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

local function unmark(v)
  if type(v) ~= "table" then return v end
  if v[1] == EMPTY and next(v, next(v)) == nil then
    return setmetatable({}, ARRAY)
  end
  for k, x in pairs(v) do
    if type(x) == "table" then v[k] = unmark(x) end
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
  if marked then v = unmark(v) end
  return v
end

return M
