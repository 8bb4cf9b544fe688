-- rbe.http: HTTP(S) client.  The C core (rbe.http.core, core/http.c) runs
-- transfers on libcurl's multi socket interface inside rbe's libuv loop,
-- one multi handle per process, connections reused across requests; this
-- module is the public surface: it builds the request (query, JSON, form,
-- auth, headers, files), raises on bad statuses, retries with backoff and
-- Retry-After, shapes the response and masks secrets in everything it
-- prints.
--
--   http.request{method, url, ...}        -> response   [yields]
--   http.get/head/delete(url, opts)        -> response   [yields]
--   http.post/put/patch(url, opts)         -> response   [yields]
--   http.client{base_url, headers, max_per_host, ...} -> client
--   http.mask_url(url), http.mask_headers(h), http.close_idle()
--
-- See docs/http.md for every option, the response and the errors.
local core = require "rbe.http.core"
local json = require "rbe.json"
local aux = require "rbe.aux"
local timer = require "rbe.timer"
local rbe = require "rbe"

local type, pairs, ipairs, error, tostring, tonumber, setmetatable, rawget,
  pcall = type, pairs, ipairs, error, tostring, tonumber, setmetatable,
  rawget, pcall
local find, sub, lower, upper, gsub, format, byte, match =
  string.find, string.sub, string.lower, string.upper, string.gsub,
  string.format, string.byte, string.match
local concat, sort = table.concat, table.sort
local floor, min, max, random = math.floor, math.min, math.max, math.random
local reveal, is_secret = aux.reveal, aux.is_secret
local request_core, sleep, now = core.request, timer.sleep, timer.now

local M = {}

M._core = core
M._stats = core._stats

-- Defaults of the retry loop.  The transfer's own defaults (timeout 30s,
-- connect_timeout 10s, follow_redirects, max_redirects 10, verify,
-- max_body 64 MiB, compressed) live in core/http.c: the spec sent to it
-- carries only what a caller changed, so a plain GET costs least.
local DEFAULTS = { retries = 0, backoff = 0.2, max_backoff = 30 }

local REQUEST_OPTS = {
  method = true, url = true, headers = true, query = true, body = true,
  body_file = true, json = true, form = true, timeout = true,
  connect_timeout = true, follow_redirects = true, max_redirects = true,
  verify = true, ca_file = true, auth = true, output = true, expect = true,
  raise = true, retries = true, backoff = true, max_backoff = true,
  retry_unsafe = true, max_body = true, compressed = true,
}
local CLIENT_OPTS = {
  base_url = true, headers = true, max_per_host = true, timeout = true,
  connect_timeout = true, follow_redirects = true, max_redirects = true,
  verify = true, ca_file = true, auth = true, expect = true, raise = true,
  retries = true, backoff = true, max_backoff = true, retry_unsafe = true,
  max_body = true, compressed = true,
}
local IDEMPOTENT = { GET = true, HEAD = true, PUT = true, DELETE = true,
  OPTIONS = true, TRACE = true }
local RETRY_STATUS = { [429] = true, [502] = true, [503] = true, [504] = true }
-- methods sent with Content-Length: 0 when they have no body
local EMPTY_BODY = { POST = true, PUT = true, PATCH = true }
local EXCERPT = 200

---------------------------------------------------------------------------
-- secrets

-- parameter and header names whose values are secrets
local SECRET_WORDS = { "token", "key", "secret", "sig", "pass", "pwd", "auth",
  "credential", "session", "cookie" }

local function unescape(s)
  return (gsub(s, "%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function secret_name(name)
  name = lower(unescape((gsub(name, "%+", " "))))
  for i = 1, #SECRET_WORDS do
    if find(name, SECRET_WORDS[i], 1, true) then return true end
  end
  return false
end
M._secret_name = secret_name

-- http.mask_url(url) -> url with the userinfo's password (or a lone user,
-- often a token) and secret-looking query values replaced by ***
function M.mask_url(url)
  if is_secret(url) then return "***" end
  if type(url) ~= "string" then return tostring(url) end
  local scheme, rest = match(url, "^(%a[%w+.-]*://)(.*)$")
  if not scheme then scheme, rest = "", url end
  local aend = find(rest, "[/?#]") or #rest + 1
  local authority, tail = sub(rest, 1, aend - 1), sub(rest, aend)
  local at = find(authority, "@[^@]*$")
  if at then
    local user = match(sub(authority, 1, at - 1), "^([^:]*):")
    authority = (user and user ~= "" and (user .. ":***") or "***")
      .. sub(authority, at)
  end
  local q = find(tail, "?", 1, true)
  if q then
    local f = find(tail, "#", q, true) or #tail + 1
    local query = gsub(sub(tail, q + 1, f - 1), "([^&=]+)=([^&]*)",
      function(k) if secret_name(k) then return k .. "=***" end end)
    tail = sub(tail, 1, q) .. query .. sub(tail, f)
  end
  return scheme .. authority .. tail
end

-- http.mask_headers(h) -> a copy of the {name = value} table h with the
-- values of Authorization, Cookie, X-Api-Key-like headers and secrets as ***
function M.mask_headers(h)
  local out = {}
  for k, v in pairs(h or {}) do
    if is_secret(v) or (type(k) == "string" and secret_name(k)) then
      out[k] = "***"
    elseif type(v) == "table" then
      out[k] = M.mask_headers(v)
    else
      out[k] = v
    end
  end
  return out
end

-- The raw secret strings of a request, to scrub from any text about it
-- (curl's messages, response excerpts).  Only built when there is an error.
local function add_secret(list, s)
  if type(s) == "string" and #s >= 3 then list[#list + 1] = s end
end

local function request_secrets(ctx)
  local list = {}
  local url = ctx.spec.url
  local authority = match(url, "^%a[%w+.-]*://([^/?#]*)") or ""
  local ui = match(authority, "^(.*)@")
  if ui then
    local user, pw = match(ui, "^([^:]*):(.*)$")
    if pw then add_secret(list, pw); add_secret(list, unescape(pw))
    else add_secret(list, ui); add_secret(list, unescape(ui)) end
  end
  local query = match(url, "%?([^#]*)")
  if query then
    for k, v in query:gmatch("([^&=]+)=([^&]*)") do
      if secret_name(k) then add_secret(list, v); add_secret(list, unescape(v)) end
    end
  end
  for _, h in ipairs(ctx.spec.headers or {}) do
    local name, value = match(h, "^([^:]+):%s*(.*)$")
    if name and (secret_name(name) or (ctx.secret_headers or {})[lower(name)]) then
      add_secret(list, value)
      add_secret(list, match(value, "^%S+%s+(.+)$"))  -- "Bearer <token>"
    end
  end
  add_secret(list, ctx.spec.password)
  for _, s in ipairs(ctx.revealed or {}) do add_secret(list, s) end
  sort(list, function(a, b) return #a > #b end)
  return list
end

local function scrub(text, secrets)
  if type(text) ~= "string" then return text end
  for i = 1, #secrets do
    local s = secrets[i]
    local from = 1
    while true do
      local a, b = find(text, s, from, true)
      if not a then break end
      text = sub(text, 1, a - 1) .. "***" .. sub(text, b + 1)
      from = a + 3
    end
  end
  return text
end

-- A URL as it may be shown: masked, and with every secret this request
-- revealed (a webhook URL given as rbe.secret has its secret in the path)
-- scrubbed out.
local function shown_url(ctx, url)
  return scrub(M.mask_url(url), request_secrets(ctx))
end

---------------------------------------------------------------------------
-- encoding

local function escape(s)
  return (gsub(s, "[^%w%-._~]", function(c) return format("%%%02X", byte(c)) end))
end
M.escape = escape

-- remember a revealed secret's text, to scrub it from error messages
local function add_revealed(ctx, s)
  local r = ctx.revealed
  if not r then r = {}; ctx.revealed = r end
  r[#r + 1] = tostring(s)
end

local function scalar(v, what, fname, ctx)
  if is_secret(v) then
    v = reveal(v)
    if ctx then add_revealed(ctx, v) end
  end
  local t = type(v)
  if t == "string" then return v end
  if t == "number" or t == "boolean" then return tostring(v) end
  error(format("%s: %s must be a string, number or boolean, got %s", fname,
    what, t), 0)
end

-- {a = 1, b = {"x", "y"}} -> "a=1&b=x&b=y" (keys sorted)
local function encode_pairs(t, what, fname, ctx)
  if type(t) == "string" then return t end
  if type(t) ~= "table" then
    error(format("%s: %s must be a table or a string, got %s", fname, what,
      type(t)), 0)
  end
  local keys = {}
  for k in pairs(t) do
    if type(k) ~= "string" then
      error(format("%s: %s keys must be strings", fname, what), 0)
    end
    keys[#keys + 1] = k
  end
  sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    local v, ek, name = t[k], escape(k), what .. "." .. k
    if type(v) == "table" and not is_secret(v) then
      for i = 1, #v do
        parts[#parts + 1] = ek .. "=" .. escape(scalar(v[i], name, fname, ctx))
      end
    else
      parts[#parts + 1] = ek .. "=" .. escape(scalar(v, name, fname, ctx))
    end
  end
  return concat(parts, "&")
end
-- http.encode_query(t) -> "a=1&b=x%20y": the query/form encoding
function M.encode_query(t)
  return encode_pairs(t, "query", "http.encode_query")
end

local function add_query(url, q)
  if q == "" then return url end
  local f = find(url, "#", 1, true)
  local frag = ""
  if f then url, frag = sub(url, 1, f - 1), sub(url, f) end
  local sep = find(url, "?", 1, true) and (find(url, "[?&]$") and "" or "&") or "?"
  return url .. sep .. q .. frag
end

local function join_url(base, path)
  if find(path, "^%a[%w+.-]*://") then return path end
  if path == "" then return base end
  if byte(base, -1) == 47 then base = sub(base, 1, -2) end
  if byte(path, 1) ~= 47 and byte(path, 1) ~= 63 then path = "/" .. path end
  return base .. path
end

---------------------------------------------------------------------------
-- durations, option checks

local function duration(v, name, fname)
  if type(v) == "number" then
    if v >= 0 and v == v and v ~= math.huge then return v end
  elseif type(v) == "string" then
    local ok, s = pcall(aux.duration, v)
    if ok then return s end
  end
  error(format("%s: %s must be a duration (seconds, or \"250ms\", \"5s\", "
    .. "\"2m\"), got %s", fname, name, type(v) == "string" and ("'" .. v .. "'")
    or type(v)), 0)
end

local function check_opts(opts, known, fname)
  for k in pairs(opts) do
    if not known[k] then
      error(format("%s: unknown option '%s'", fname, tostring(k)), 0)
    end
  end
end

local function check_int(v, name, fname, lo)
  if math.type(v) ~= "integer" or v < lo then
    error(format("%s: %s must be an integer >= %d", fname, name, lo), 0)
  end
  return v
end

---------------------------------------------------------------------------
-- responses

local Headers = { __name = "rbe.http.headers" }
Headers.__index = function(t, k)
  if type(k) == "string" then
    local l = lower(k)
    if l ~= k then return rawget(t, l) end
  end
end

local Response = { __name = "rbe.http.response" }
local parse_headers, unpack_str = core.parse_headers, string.unpack

-- methods; `headers` and `timings` are built from the raw header block
-- `_h` and the packed `_t` on first use (most callers never look)
Response.__index = function(res, k)
  local m = Response[k]
  if m ~= nil then return m end
  if k == "headers" or k == "_raw" then
    local map, raw = parse_headers(rawget(res, "_h") or "")
    rawset(res, "headers", setmetatable(map, Headers))
    rawset(res, "_raw", raw)
    return rawget(res, k)
  elseif k == "timings" then
    local t = rawget(res, "_t")
    if not t then return nil end
    local dns, connect, tls, first, total, redirect = unpack_str("dddddd", t)
    local tt = { dns = dns, connect = connect, tls = tls, first_byte = first,
      total = total, redirect = redirect }
    rawset(res, "timings", tt)
    return tt
  end
end

-- A request's context (its spec holds the revealed secrets, for scrubbing
-- error texts) prints as an opaque value, so dumping a response's fields
-- shows no secret.
local Ctx = { __name = "rbe.http.request", __tostring = function(c)
  return "http request " .. c.method .. " " .. M.mask_url(c.spec.url)
end }

-- res:header_all(name) -> every value of a repeated header, in order
function Response:header_all(name)
  local raw, out = self._raw, {}
  name = lower(name)
  for i = 1, #raw, 2 do
    if lower(raw[i]) == name then out[#out + 1] = raw[i + 1] end
  end
  return out
end

local function excerpt_of(s, n)
  if type(s) ~= "string" or s == "" then return "" end
  n = n or EXCERPT
  local e = sub(s, 1, n)
  e = gsub(gsub(e, "[\r\n\t]+", " "), "[%z\1-\31\127]", "?")
  if #s > n then e = e .. "..." end
  return e
end

-- res:json() -> the decoded body; a body that is not JSON raises a `json`
-- error naming the request, status and content type
function Response:json()
  local ctx = self._ctx or { method = self.method, spec = { url = self.url } }
  local body = self.body
  local function fail(what)
    local secrets = request_secrets(ctx)
    local e = aux.error("json", scrub(format(
      "%s %s: %s (status %d, content-type %s)", self.method,
      M.mask_url(self.url), what, self.status,
      tostring(self.headers["content-type"])), secrets))
    e.code = "EBADMSG"
    e.status = self.status
    e.method = self.method
    e.url = M.mask_url(self.url)
    error(e, 0)
  end
  if body == nil then
    fail("the body was written to " .. tostring(self.output or "a file")
      .. ", not kept in memory")
  end
  if body == "" then fail("response body is empty, not JSON") end
  local ok, v = pcall(json.decode, body)
  if not ok then
    fail("response body is not valid JSON: " .. tostring(v.message or v)
      .. "; body starts: '" .. excerpt_of(body, 80) .. "'")
  end
  return v
end

Response.__tostring = function(r)
  return format("http response %d%s (%s %s, %d bytes)", r.status,
    r.reason ~= "" and (" " .. r.reason) or "", r.method, M.mask_url(r.url),
    r.size or 0)
end

---------------------------------------------------------------------------
-- errors

-- RFC 9110 Retry-After: delay-seconds or an IMF-fixdate
local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7,
  Aug = 8, Sep = 9, Oct = 10, Nov = 11, Dec = 12 }

local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = floor(y / 400)
  local yoe = y - era * 400
  local doy = floor((153 * (m + (m > 2 and -3 or 9)) + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function retry_after(v)
  if type(v) ~= "string" then return nil end
  local n = match(v, "^%s*(%d+)%s*$")
  if n then return tonumber(n) end
  local d, mon, y, h, mi, s = match(v,
    "^%s*%a+,%s*(%d+)%s+(%a+)%s+(%d+)%s+(%d+):(%d+):(%d+)%s+GMT%s*$")
  if not d or not MONTHS[mon] then return nil end
  local epoch = days_from_civil(tonumber(y), MONTHS[mon], tonumber(d)) * 86400
    + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s)
  return max(0, epoch - timer.time())
end
M._retry_after = retry_after

local function status_error(res, ctx)
  local secrets = request_secrets(ctx)
  local url = shown_url(ctx, res.url ~= "" and res.url or ctx.spec.url)
  local body = scrub(excerpt_of(res.body or res._excerpt), secrets)
  local e = aux.error("http", scrub(format("%s %s -> %d%s%s", ctx.method, url,
    res.status, res.reason ~= "" and (" " .. res.reason) or "",
    body ~= "" and (": " .. body) or ""), secrets))
  e.code = res.status
  e.status = res.status
  e.method = ctx.method
  e.url = url
  e.body = body
  e.retryable = RETRY_STATUS[res.status] or false
  e.retry_after = retry_after(res.headers["retry-after"])
  return e
end

local function transport_error(err, ctx)
  local secrets = request_secrets(ctx)
  local url = shown_url(ctx, ctx.spec.url)
  err.message = scrub(format("%s %s: %s", ctx.method, url, err.message), secrets)
  err.method = ctx.method
  err.url = url
  return err
end

---------------------------------------------------------------------------
-- building a request

local function header_list(ctx, client_headers, headers, fname)
  -- lower-case name -> {Name, value...}; request headers replace a
  -- client's of the same name
  local by = {}
  local order = {}
  local function put(src)
    for name, v in pairs(src) do
      if type(name) ~= "string" or not find(name, "^[%w!#$%%&'*+.^_`|~-]+$") then
        error(format("%s: bad header name %s", fname, tostring(name)), 0)
      end
      local l = lower(name)
      if not by[l] then order[#order + 1] = l end
      if is_secret(v) then
        ctx.secret_headers = ctx.secret_headers or {}
        ctx.secret_headers[l] = true
      end
      if v == false then
        by[l] = { name, false }
      elseif type(v) == "table" and not is_secret(v) then
        local e = { name }
        for i = 1, #v do e[#e + 1] = scalar(v[i], "header " .. name, fname, ctx) end
        by[l] = e
      else
        by[l] = { name, scalar(v, "header " .. name, fname, ctx) }
      end
    end
  end
  if client_headers then put(client_headers) end
  if headers then
    if type(headers) ~= "table" then
      error(fname .. ": headers must be a table of name = value", 0)
    end
    put(headers)
  end
  return by, order
end

local function set_header(by, order, name, value)
  local l = lower(name)
  if by[l] then return end
  order[#order + 1] = l
  by[l] = { name, value }
end

local Client = {}
Client.__index = Client

-- a request's option, else its client's, else the retry defaults
local function opt(o, c, k)
  local v = o and o[k]
  if v == nil and c then v = c._opts[k] end
  if v == nil then v = DEFAULTS[k] end
  return v
end

-- Build the spec for the C core plus what the retry loop and errors need.
local function build(c, method, url, o, fname)
  -- the common case, a bare request: http.get(url)
  if o == nil and c == nil and type(url) == "string" and find(url, "^https?://")
     and (method == "GET" or method == "HEAD" or method == "DELETE") then
    local spec = { method = method, url = url }
    return spec, setmetatable({ method = method, spec = spec }, Ctx)
  end
  if o ~= nil and type(o) ~= "table" then
    error(format("%s: options must be a table, got %s", fname, type(o)), 0)
  end
  if o then check_opts(o, REQUEST_OPTS, fname) end
  if c and c._closed then error(fname .. ": the client is closed", 0) end
  local ctx = setmetatable({ method = false, spec = false }, Ctx)
  if is_secret(url) then
    url = reveal(url)
    add_revealed(ctx, url)
    -- servers echo paths (error pages): the path of a secret URL is secret
    local path = type(url) == "string" and match(url, "^%a[%w+.-]*://[^/]+(/[^?#]+)")
    if path and #path >= 8 then add_revealed(ctx, path) end
  end
  if type(url) ~= "string" or url == "" then
    error(format("%s: url must be a string, got %s", fname, type(url)), 0)
  end
  if type(method) ~= "string" or not find(method, "^%a+$") then
    error(format("%s: bad method %s", fname, tostring(method)), 0)
  end
  method = upper(method)
  if c and c.base_url then url = join_url(c.base_url, url) end
  local scheme = match(url, "^(%a[%w+.-]*)://")
  scheme = scheme and lower(scheme)
  if scheme ~= "http" and scheme ~= "https" then
    error(format("%s: only http:// and https:// URLs are allowed, got '%s'",
      fname, M.mask_url(url)), 0)
  end
  local spec = { method = method, url = url }
  ctx.method, ctx.spec = method, spec

  if o then
    if o.query ~= nil then
      spec.url = add_query(url, encode_pairs(o.query, "query", fname, ctx))
    end
    if o.verify ~= nil then
      if type(o.verify) ~= "boolean" then
        error(fname .. ": verify must be a boolean", 0)
      end
      spec.verify = o.verify
    end
    if o.output ~= nil then
      if type(o.output) ~= "string" or o.output == "" then
        error(fname .. ": output must be a file path", 0)
      end
      spec.output = o.output
    end
  end

  local by, order
  local chdr = c and c._headers
  local hdrs = o and o.headers
  if chdr or hdrs then by, order = header_list(ctx, chdr, hdrs, fname) end

  local auth = opt(o, c, "auth")
  if auth ~= nil then
    by = by or {}
    order = order or {}
    if type(auth) ~= "table" then
      error(fname .. ": auth must be {bearer = token} or "
        .. "{basic = {user, password}}", 0)
    end
    if auth.bearer ~= nil then
      local tok = scalar(auth.bearer, "auth.bearer", fname, ctx)
      add_revealed(ctx, tok)
      set_header(by, order, "Authorization", "Bearer " .. tok)
    elseif type(auth.basic) == "table" then
      local b = auth.basic
      spec.user = scalar(b.user or b[1], "auth.basic user", fname, ctx)
      spec.password = scalar(b.password or b[2] or "", "auth.basic password",
        fname, ctx)
    else
      error(fname .. ": auth must be {bearer = token} or "
        .. "{basic = {user, password}}", 0)
    end
  end

  -- the body: at most one of body, json, form, body_file
  if o then
    local n, ctype = 0, nil
    if o.body ~= nil then
      n = n + 1
      local b = o.body
      if is_secret(b) then b = reveal(b) end
      if type(b) ~= "string" then
        error(fname .. ": body must be a string (use json = value for JSON)", 0)
      end
      spec.body, ctype = b, "application/octet-stream"
    end
    if o.json ~= nil then
      n = n + 1
      spec.body, ctype = json.encode(o.json), "application/json"
    end
    if o.form ~= nil then
      n = n + 1
      spec.body = encode_pairs(o.form, "form", fname, ctx)
      ctype = "application/x-www-form-urlencoded"
    end
    if o.body_file ~= nil then
      n = n + 1
      if type(o.body_file) ~= "string" then
        error(fname .. ": body_file must be a file path", 0)
      end
      spec.body_file, ctype = o.body_file, "application/octet-stream"
    end
    if n > 1 then
      error(fname .. ": give only one of body, json, form and body_file", 0)
    end
    if n == 1 then
      by = by or {}
      order = order or {}
      set_header(by, order, "Content-Type", ctype)
      -- no 100-continue round trip (a second wasted on servers without it)
      set_header(by, order, "Expect", false)
    end
  end
  if EMPTY_BODY[method] and spec.body == nil and spec.body_file == nil then
    -- an empty body, not curl's form Content-Type for it
    by = by or {}
    order = order or {}
    set_header(by, order, "Content-Type", false)
  end

  if by then
    local list = {}
    for i = 1, #order do
      local e = by[order[i]]
      if e[2] == false then
        list[#list + 1] = e[1] .. ":"          -- curl: do not send it
      else
        for j = 2, #e do list[#list + 1] = e[1] .. ": " .. e[j] end
      end
    end
    spec.headers = list
  end

  -- absent fields take core/http.c's defaults
  local v = opt(o, c, "timeout")
  if v ~= nil then spec.timeout = v and duration(v, "timeout", fname) or 0 end
  v = opt(o, c, "connect_timeout")
  if v ~= nil then
    spec.connect_timeout = v and duration(v, "connect_timeout", fname) or 0
  end
  v = opt(o, c, "follow_redirects")
  if v ~= nil then spec.follow = v and true or false end
  v = opt(o, c, "max_redirects")
  if v ~= nil then spec.max_redirects = check_int(v, "max_redirects", fname, 0) end
  v = opt(o, c, "ca_file")
  if v ~= nil then
    if type(v) ~= "string" then error(fname .. ": ca_file must be a path", 0) end
    spec.ca_file = v
  end
  v = opt(o, c, "max_body")
  if v ~= nil then spec.max_body = check_int(v, "max_body", fname, 0) end
  v = opt(o, c, "compressed")
  if v ~= nil then spec.compressed = v and true or false end
  v = opt(o, c, "raise")
  if v ~= nil then spec.raise = v ~= false end
  local expect = opt(o, c, "expect")
  if expect ~= nil then
    if math.type(expect) == "integer" then expect = { expect } end
    if type(expect) ~= "table" or #expect == 0 then
      error(fname .. ": expect must be a status or a list of statuses", 0)
    end
    local set = {}
    for i = 1, #expect do
      set[check_int(expect[i], "expect[" .. i .. "]", fname, 100)] = true
    end
    spec.expect = expect
    ctx.expect = set
  end
  if c and c.max_per_host then
    local host = match(spec.url, "^(%a[%w+.-]*://[^/?#]*)")
    host = lower(gsub(host, "//.*@", "//"))
    spec.limit_key = c._id .. " " .. host
    spec.limit = c.max_per_host
  end

  ctx.retries = check_int(opt(o, c, "retries"), "retries", fname, 0)
  if ctx.retries > 0 then
    ctx.backoff = duration(opt(o, c, "backoff"), "backoff", fname)
    ctx.max_backoff = duration(opt(o, c, "max_backoff"), "max_backoff", fname)
    ctx.can_retry = IDEMPOTENT[method] or opt(o, c, "retry_unsafe") == true
  end
  return spec, ctx
end

---------------------------------------------------------------------------
-- sending

local function log_debug(ctx, res, err, t0)
  local what = res and tostring(res.status) or tostring(err.code)
  rbe.log("debug", "http %s %s -> %s (%.1f ms)", ctx.method,
    shown_url(ctx, ctx.spec.url), what, (now() - t0) * 1000)
end

-- res from core.request's values (see req_push in core/http.c)
local function response(ctx, attempt, status, reason, url, body, size, h, t,
                        redirects, version, output, excerpt)
  return setmetatable({ status = status, reason = reason, url = url,
    body = body, size = size, _h = h, _t = t, redirects = redirects,
    http_version = version, output = output, _excerpt = excerpt,
    method = ctx.method, ok = status < 400, attempts = attempt, _ctx = ctx },
    Response)
end

local function send(spec, ctx)
  local attempt = 0
  local debug = rbe.log_level == "debug"
  while true do
    attempt = attempt + 1
    local t0 = debug and now()
    local res, err
    local status, e2, u, body, size, h, t, redirects, version, output, excerpt =
      request_core(spec)
    if status then
      res = response(ctx, attempt, status, e2, u, body, size, h, t, redirects,
        version, output, excerpt)
    else
      err = e2
    end
    local give_back
    if res then
      local good
      if ctx.expect then good = ctx.expect[status] == true
      else good = status < 400 end
      if not good then
        if spec.raise ~= false then err = status_error(res, ctx)
        elseif RETRY_STATUS[status] then give_back = res
        else return res end
      else
        if debug then log_debug(ctx, res, nil, t0) end
        return res
      end
    else
      err = transport_error(err, ctx)
    end
    if debug then log_debug(ctx, res, err, t0) end
    -- another attempt?
    local retries = ctx.retries or 0
    local retryable = give_back and true or err.retryable
    if not retryable or attempt > retries or not ctx.can_retry then
      if give_back then return give_back end
      err.attempts = attempt
      error(err, 0)
    end
    local delay = min(ctx.max_backoff, ctx.backoff * 2 ^ (attempt - 1))
    delay = delay / 2 + random() * delay / 2
    local ra = res and retry_after(res.headers["retry-after"])
    if ra then
      if ra > ctx.max_backoff then
        -- the server asks for longer than we may wait: give up now
        if give_back then return give_back end
        err.attempts = attempt
        error(err, 0)
      end
      delay = max(delay, ra)
    end
    rbe.log("info", "http %s %s: %s; retry %d/%d in %.2fs", ctx.method,
      shown_url(ctx, spec.url), res and tostring(res.status) or tostring(err.code),
      attempt, retries, delay)
    sleep(delay)
  end
end

local function do_request(c, method, url, o, fname)
  local spec, ctx = build(c, method, url, o, fname)
  return send(spec, ctx)
end

-- http.request{method = "GET", url = ..., ...} -> response  [yields]
-- or http.request(url, opts)
function M.request(o, o2)
  if type(o) == "string" or is_secret(o) then
    return do_request(nil, o2 and o2.method or "GET", o, o2, "http.request")
  end
  if type(o) ~= "table" then
    error("http.request: options table expected, got " .. type(o), 2)
  end
  return do_request(nil, o.method or "GET", o.url, o, "http.request")
end

local SHORT = { "get", "head", "delete", "post", "put", "patch", "options" }
for _, m in ipairs(SHORT) do
  local METHOD, fname = upper(m), "http." .. m
  M[m] = function(url, o)
    if o and o.method ~= nil and upper(o.method) ~= METHOD then
      error(fname .. ": method option conflicts with " .. fname, 2)
    end
    if o and o.url ~= nil then
      error(fname .. ": give the url as the first argument", 2)
    end
    return do_request(nil, METHOD, url, o, fname)
  end
end

---------------------------------------------------------------------------
-- clients

local next_client = 0

-- http.client{base_url, headers, max_per_host, <request defaults>} -> client
function M.client(o)
  o = o or {}
  if type(o) ~= "table" then
    error("http.client: options table expected, got " .. type(o), 2)
  end
  check_opts(o, CLIENT_OPTS, "http.client")
  if o.verify == false then
    error("http.client: verify = false must be given per request, not for "
      .. "a whole client (or give the client a ca_file)", 2)
  end
  local base = o.base_url
  if base ~= nil then
    if type(base) ~= "string" or not find(lower(base), "^https?://") then
      error("http.client: base_url must be an http:// or https:// URL", 2)
    end
  end
  local mph = o.max_per_host
  if mph ~= nil and (math.type(mph) ~= "integer" or mph < 1) then
    error("http.client: max_per_host must be a positive integer", 2)
  end
  if o.headers ~= nil and type(o.headers) ~= "table" then
    error("http.client: headers must be a table of name = value", 2)
  end
  local opts = {}
  for k, v in pairs(o) do
    if k ~= "base_url" and k ~= "headers" and k ~= "max_per_host" then
      opts[k] = v
    end
  end
  next_client = next_client + 1
  return setmetatable({ base_url = base, max_per_host = mph, _headers = o.headers,
    _opts = opts, _id = next_client }, Client)
end

-- client:request{method, url, ...} -> response  [yields]
function Client:request(o)
  if type(o) ~= "table" then
    error("client:request: options table expected, got " .. type(o), 2)
  end
  return do_request(self, o.method or "GET", o.url, o, "client:request")
end

for _, m in ipairs(SHORT) do
  local METHOD, fname = upper(m), "client:" .. m
  Client[m] = function(self, url, o)
    if o and o.method ~= nil and upper(o.method) ~= METHOD then
      error(fname .. ": method option conflicts with " .. fname, 2)
    end
    if o and o.url ~= nil then
      error(fname .. ": give the url as the first argument", 2)
    end
    return do_request(self, METHOD, url, o, fname)
  end
end

-- client:close(): later requests raise; those in flight finish
function Client:close() self._closed = true end
Client.__close = Client.close
Client.__gc = Client.close
Client.__name = "rbe.http.client"
Client.__tostring = function(c)
  return format("http client %s%s", c.base_url and M.mask_url(c.base_url) or "",
    c._closed and " (closed)" or "")
end

-- http.close_idle() -> boolean: close the idle cached connections (false
-- while requests are in flight); a long-lived process rarely needs it
function M.close_idle()
  return core.close_idle()
end

M.json = json

return M
