-- rbe.pretty: values as an operator reads them at a console.  Nested
-- tables with sorted keys, one line when they fit and indented otherwise,
-- cycles marked, depth and length limits; query results (an array of row
-- tables with a `columns` field) as aligned tables like psql, or one
-- record per block in expanded display.  Secrets never print: rbe.secret
-- values, fields whose name says secret (password, token, ...), and the
-- password in URLs and DSNs all show as ***.
--
--   pretty.format(v[, opts])   -> string
--   pretty.rows(rows[, opts])  -> string   (psql-like table)
--   pretty.is_rows(v)          -> boolean
--   pretty.mask(s)             -> s with URL/DSN passwords as ***
--   pretty.secret_key(k)       -> boolean  (a field name that holds secrets)
--
-- opts: depth (4), items (100 per table), width (80), string_max (400 in
-- tables), cell_max (60 in aligned rows), expanded (false|true|"auto"),
-- elapsed (seconds, shown in the row count line), raw (top-level strings
-- unquoted, default true).
local aux = require "rbe.aux"

local type, pairs, ipairs, tostring, getmetatable, rawget, pcall, select =
  type, pairs, ipairs, tostring, getmetatable, rawget, pcall, select
local concat, sort = table.concat, table.sort
local fmt, rep = string.format, string.rep
local is_secret, is_error, null = aux.is_secret, aux.is_error, aux.null
local mtype = math.type

local M = {}

local DEFAULTS = { depth = 4, items = 100, width = 80, string_max = 400,
                   cell_max = 60 }

local function opt(opts, k)
  local v = opts and opts[k]
  if v == nil then return DEFAULTS[k] end
  return v
end

---------------------------------------------------------------------------
-- secrets

-- words that make a field secret: anywhere in the name (STRONG), or as a
-- whole word of it (db_token, token_value, but not tokens_used)
local STRONG = { "password", "passwd", "secret", "apikey", "api_key",
  "private_key", "access_key", "credential", "authorization" }
local WORDS = { "token", "pwd", "pass", "cookie", "auth" }

-- pretty.secret_key(k) -> true when a field named k holds a secret
function M.secret_key(k)
  if type(k) ~= "string" then return false end
  local l = "_" .. k:lower():gsub("[%-%s%.]", "_") .. "_"
  for _, w in ipairs(STRONG) do
    if l:find(w, 1, true) then return true end
  end
  for _, w in ipairs(WORDS) do
    if l:find("_" .. w .. "_", 1, true) then return true end
  end
  return false
end

-- pretty.mask(s) -> s with the password of URLs (scheme://user:pw@host)
-- and of DSN/config words (password=..., "password": "...") as ***
function M.mask(s)
  if type(s) ~= "string" then return s end
  if not s:find("[@=:]") then return s end
  s = s:gsub("(%a[%w+.-]*://[^/%s:@]*:)([^@%s/]+)(@)", "%1***%3")
  local key = "([%w_]*[Pp][Aa][Ss][Ss][%w_]*%s*=%s*)"
  s = s:gsub(key .. "(%b'')", "%1'***'")
  s = s:gsub(key .. '(%b"")', '%1"***"')
  s = s:gsub(key .. "([^%s'\"&;,][^%s'&;,]*)", function(k, v)
    if v == "***" then return nil end
    return k .. "***"
  end)
  s = s:gsub('("[%w_]*[Pp][Aa][Ss][Ss][%w_]*"%s*:%s*)("[^"]*")', '%1"***"')
  return s
end
local mask = M.mask

---------------------------------------------------------------------------
-- scalars

-- display width of a string (UTF-8 code points; bytes if not UTF-8)
local function width(s)
  return utf8.len(s) or #s
end
M.width = width

-- cut s to at most n display columns, marking the cut with "..."
local function cut(s, n)
  if width(s) <= n then return s end
  if n <= 3 then return ("..."):sub(1, n) end
  local ok, stop = pcall(utf8.offset, s, n - 2)
  if not ok or not stop then return s:sub(1, n - 3) .. "..." end
  return s:sub(1, stop - 1) .. "..."
end

local ESC = { ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t", ['"'] = '\\"',
              ["\\"] = "\\\\", ["\0"] = "\\0" }

local function quote(s, max)
  s = mask(s)
  local extra = ""
  if max and #s > max then
    extra = fmt("...(%d more bytes)", #s - max)
    s = s:sub(1, max)
    -- do not leave half a UTF-8 sequence
    while #s > 0 and not utf8.len(s) and s:byte(-1) >= 0x80 do s = s:sub(1, -2) end
  end
  s = s:gsub('[%c"\\]', function(c)
    return ESC[c] or fmt("\\%03d", c:byte())
  end)
  return '"' .. s .. '"' .. extra
end

local function number(n)
  if mtype(n) == "integer" then return tostring(n) end
  if n ~= n then return "nan" end
  if n == math.huge then return "inf" end
  if n == -math.huge then return "-inf" end
  local s = fmt("%.14g", n)
  if not s:find("[%.eEn]") then s = s .. ".0" end
  return s
end

local function func_name(f)
  local info = debug.getinfo(f, "S")
  if info.what == "C" then return "function: builtin" end
  return fmt("function: %s:%d", info.short_src, info.linedefined)
end

local function safe_tostring(v)
  local ok, s = pcall(tostring, v)
  if ok and type(s) == "string" then return s end
  return "<" .. type(v) .. ">"
end

-- a value that prints as itself (not walked): string form or nil
local function atom(v, max)
  local t = type(v)
  if t == "string" then return quote(v, max) end
  if t == "number" then return number(v) end
  if t == "nil" or t == "boolean" then return tostring(v) end
  if v == null then return "null" end
  if is_secret(v) then return "***" end
  if t == "function" then return func_name(v) end
  if t == "table" then
    if is_error(v) then return nil end
    local mt = getmetatable(v)
    if type(mt) == "table" and rawget(mt, "__tostring") then
      return mask(safe_tostring(v))
    end
    return nil
  end
  return mask(safe_tostring(v))     -- userdata (handles), threads
end

---------------------------------------------------------------------------
-- tables

local KEY_ORDER = { number = 1, string = 2, boolean = 3 }

local function key_less(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then
    return (KEY_ORDER[ta] or 9) < (KEY_ORDER[tb] or 9) or
      ((KEY_ORDER[ta] or 9) == (KEY_ORDER[tb] or 9) and ta < tb)
  end
  if ta == "number" or ta == "string" then return a < b end
  if ta == "boolean" then return not a and b end
  return safe_tostring(a) < safe_tostring(b)
end

local KEYWORDS = {}
for w in ([[and break do else elseif end false for function goto if in
  local nil not or repeat return then true until while]]):gmatch("%a+") do
  KEYWORDS[w] = true
end

local function key_text(k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") and not KEYWORDS[k] then
    return k
  end
  return "[" .. (atom(k, 60) or safe_tostring(k)) .. "]"
end

-- the keys of t: array part 1..n first (shown without keys), then the
-- rest sorted
local function ordered_keys(t)
  local n = 0
  while rawget(t, n + 1) ~= nil do n = n + 1 end
  local rest = {}
  for k in pairs(t) do
    if not (mtype(k) == "integer" and k >= 1 and k <= n) then
      rest[#rest + 1] = k
    end
  end
  sort(rest, key_less)
  return n, rest
end

local walk

-- render table t; returns its text and whether it is on one line
local function walk_table(t, o, depth, indent, path)
  if path[t] then return "<cycle>", true end
  if depth >= o.depth then
    local n = 0
    for _ in pairs(t) do n = n + 1 end
    return n == 0 and "{}" or "{...}", true
  end
  path[t] = true
  local n, rest = ordered_keys(t)
  local total = n + #rest
  local parts, shown = {}, 0
  local inner = indent .. "  "
  local all_inline = true
  local function add(text, inline)
    parts[#parts + 1] = text
    if not inline then all_inline = false end
  end
  for i = 1, n do
    if shown >= o.items then break end
    shown = shown + 1
    local s, inline = walk(t[i], o, depth + 1, inner, path, nil)
    add(s, inline)
  end
  for _, k in ipairs(rest) do
    if shown >= o.items then break end
    shown = shown + 1
    local v = t[k]
    local s, inline
    if M.secret_key(k) and v ~= nil and type(v) ~= "table" and v ~= false then
      s, inline = "***", true
    else
      s, inline = walk(v, o, depth + 1, inner, path, k)
    end
    add(key_text(k) .. " = " .. s, inline)
  end
  if total > shown then add(fmt("...(%d more)", total - shown), true) end
  path[t] = nil
  if #parts == 0 then return "{}", true end
  if all_inline then
    local one = "{" .. concat(parts, ", ") .. "}"
    if #indent + width(one) <= o.width then return one, true end
    if #rest == 0 and n > 0 then
      -- a long array of short values: fill the lines
      local lines, cur = {}, nil
      for _, p in ipairs(parts) do
        if cur and #inner + width(cur) + 2 + width(p) > o.width then
          lines[#lines + 1] = cur .. ","
          cur = p
        else
          cur = cur and (cur .. ", " .. p) or p
        end
      end
      lines[#lines + 1] = cur
      return "{\n" .. inner .. concat(lines, "\n" .. inner) .. "\n" .. indent .. "}",
        false
    end
  end
  return "{\n" .. inner .. concat(parts, ",\n" .. inner) .. "\n" .. indent .. "}",
    false
end

walk = function(v, o, depth, indent, path)
  if type(v) == "table" and M.is_rows(v) and depth > 0 then
    return fmt("<%d rows>", #v), true
  end
  local a = atom(v, o.string_max)
  if a then return a, true end
  return walk_table(v, o, depth, indent, path)
end

---------------------------------------------------------------------------
-- rows

-- pretty.is_rows(v) -> true for a query result: an array of row tables
-- with a `columns` field
function M.is_rows(v)
  if type(v) ~= "table" or is_error(v) then return false end
  local cols = rawget(v, "columns")
  if type(cols) ~= "table" then return false end
  local first = rawget(v, 1)
  return first == nil or type(first) == "table"
end

local function column_names(rows)
  local names = {}
  for i, c in ipairs(rows.columns) do
    if type(c) == "table" then c = c.name or c[1] end
    names[i] = tostring(c)
  end
  if #names == 0 and type(rows[1]) == "table" then
    for k in pairs(rows[1]) do
      if type(k) == "string" then names[#names + 1] = k end
    end
    sort(names)
  end
  return names
end

local function ctrl(c) return ESC[c] or "?" end

-- one cell as text; secret: the column holds secrets
local function cell(v, secret, max)
  if secret and v ~= nil and v ~= null then return "***", false end
  local t = type(v)
  if t == "string" then
    local s = mask(v)
    if s:find("%c") then s = s:gsub("%c", ctrl) end
    return max and cut(s, max) or s, false
  end
  if t == "number" then return number(v), true end
  if v == nil or v == null then return "null", false end
  local s = walk(v, { depth = 3, items = 20, width = 1e9, string_max = 80 },
                 0, "", {})
  s = s:gsub("\n%s*", " ")
  return max and cut(s, max) or s, false
end

local function count_line(n, o)
  local s = fmt("(%d row%s", n, n == 1 and "" or "s")
  if o.elapsed then s = s .. ", " .. M.duration(o.elapsed) end
  return s .. ")"
end

-- "1.2 ms", "340 ms", "2.51 s"
function M.duration(secs)
  if secs < 1 then
    local ms = secs * 1000
    return ms < 10 and fmt("%.1f ms", ms) or fmt("%.0f ms", ms)
  end
  if secs < 60 then return fmt("%.2f s", secs) end
  return fmt("%dm%02ds", secs // 60, math.floor(secs % 60))
end

local function center(s, w)
  local pad = w - width(s)
  local left = pad // 2
  return rep(" ", left) .. s .. rep(" ", pad - left)
end

local function aligned(rows, names, o, limit)
  local n = #rows
  local widths, numeric, grid, cw, secret = {}, {}, {}, {}, {}
  for c, name in ipairs(names) do
    widths[c] = width(name)
    numeric[c] = n > 0
    secret[c] = M.secret_key(name)
  end
  local max = o.cell_max
  for r = 1, limit do
    local row, line, lw = rows[r], {}, {}
    for c, name in ipairs(names) do
      local v = row[name]
      local s, isnum = cell(v, secret[c], max)
      local w = width(s)
      line[c], lw[c] = s, w
      if not isnum and v ~= nil and v ~= null then numeric[c] = false end
      if w > widths[c] then widths[c] = w end
    end
    grid[r], cw[r] = line, lw
  end
  local out, head, rule = {}, {}, {}
  for c, name in ipairs(names) do
    head[c] = center(name, widths[c])
    rule[c] = rep("-", widths[c] + 2)
  end
  out[1] = (" " .. concat(head, " | ")):gsub("%s+$", "")
  out[2] = concat(rule, "+")
  for r = 1, limit do
    local line = {}
    for c = 1, #names do
      local s = grid[r][c]
      local pad = rep(" ", widths[c] - cw[r][c])
      line[c] = numeric[c] and pad .. s or s .. pad
    end
    out[#out + 1] = (" " .. concat(line, " | ")):gsub("%s+$", "")
  end
  return out
end

local function expanded(rows, names, o, limit)
  local out = {}
  local kw = 0
  for _, name in ipairs(names) do kw = math.max(kw, width(name)) end
  for r = 1, limit do
    local lines, vw = {}, 0
    for c, name in ipairs(names) do
      local s = cell(rows[r][name], M.secret_key(name), nil)
      lines[c] = name .. rep(" ", kw - width(name)) .. " | " .. s
      vw = math.max(vw, width(s))
    end
    local head = fmt("-[ RECORD %d ]", r)
    local total = kw + 3 + vw
    out[#out + 1] = head .. rep("-", math.max(1, total - width(head)))
    for _, l in ipairs(lines) do out[#out + 1] = (l:gsub("%s+$", "")) end
  end
  return out
end

-- pretty.rows(rows[, opts]) -> the result as psql prints it, with the row
-- count (and opts.elapsed) below
function M.rows(rows, opts)
  local o = {}
  for k, v in pairs(DEFAULTS) do o[k] = v end
  for k, v in pairs(opts or {}) do o[k] = v end
  local names = column_names(rows)
  local n = #rows
  local limit = n
  if o.max_rows and n > o.max_rows then limit = o.max_rows end
  local out
  local mode = o.expanded
  if mode == true or mode == "on" then
    out = expanded(rows, names, o, limit)
  else
    out = aligned(rows, names, o, limit)
    if (mode == "auto") and limit > 0 and width(out[2]) > o.width then
      out = expanded(rows, names, o, limit)
    end
  end
  if n == 0 and (mode == true or mode == "on") then out = { "(0 rows)" }
  else
    if limit < n then out[#out + 1] = fmt("...(%d more rows)", n - limit) end
    out[#out + 1] = count_line(n, o)
  end
  return concat(out, "\n")
end

---------------------------------------------------------------------------

-- pretty.format(v[, opts]) -> string
function M.format(v, opts)
  local o = {}
  for k, d in pairs(DEFAULTS) do o[k] = d end
  for k, x in pairs(opts or {}) do o[k] = x end
  if M.is_rows(v) then return M.rows(v, o) end
  if type(v) == "string" and o.raw ~= false then return mask(v) end
  return (walk(v, o, 0, "", {}))
end

-- pretty.format_all(n, ...) -> the values on one line each (several short
-- scalars share a line, tab-separated, as lua.c prints them)
function M.format_all(opts, ...)
  local n = select("#", ...)
  local parts, simple = {}, true
  for i = 1, n do
    local v = select(i, ...)
    parts[i] = M.format(v, opts)
    if type(v) == "table" or parts[i]:find("\n") then simple = false end
  end
  return concat(parts, simple and "\t" or "\n")
end

return M
