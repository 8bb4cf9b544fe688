-- health: the checks of the runbooks' gates and triggers.  Each check
-- measures something now and returns `ok, evidence`: ok is true when the
-- thing is healthy; evidence is a table with at least `check` (its name),
-- `reason` (one line a person reads: "error rate 12.5% > 5% (25 of 200
-- lines in 5m)") and `unknown` (true when the check could not measure:
-- no data, a monitoring system that does not answer).  A failed check is
-- a value, not an error: only misuse raises (and the cancels and
-- timeouts of the task running it, which must travel on).
--
--   health.http(url, {status, json, max_ms, ...})         -> ok, ev  [yields]
--   health.pg(db, {exists, missing, counts, max_ms})       -> ok, ev  [yields]
--   health.redis(r, {max_ms})                              -> ok, ev  [yields]
--   health.error_rate{log, pattern, window, max, ...}      -> ok, ev
--   health.prometheus{url, query, max, min, ...}           -> ok, ev  [yields]
--   health.assert(ok, ev) -> ev, or raises a `health` error (for gates)
--   health.failed(ok, ev) -> fired, ev  (for triggers: unknown never fires)
--
-- See docs/modules/health.md.
local rbe = require "rbe"
local http = require "rbe.http"
local json = require "rbe.json"

local type, pairs, ipairs, error, tostring, tonumber, pcall, next =
  type, pairs, ipairs, error, tostring, tonumber, pcall, next
local format, concat, floor = string.format, table.concat, math.floor

local M = {}

---------------------------------------------------------------------------
-- helpers

local function check_fields(t, known, fname)
  for k in pairs(t) do
    if not known[k] then
      error(format("%s: unknown option '%s'", fname, tostring(k)), 3)
    end
  end
end

-- Errors that belong to the task (a cancel, Ctrl-C, the enclosing
-- rbe.timeout of a gate or a budget) are raised again; any other error is
-- what the check measured.
local function passthrough(err)
  if rbe.is_error(err) and (err.kind == "cancelled"
      or (err.kind == "timeout" and err.code == "ETIMEDOUT")) then
    error(err, 0)
  end
  return err
end

local function errmsg(err)
  if rbe.is_error(err) then
    return tostring(err.message) .. (err.code ~= nil and (" (" .. tostring(err.code) .. ")") or "")
  end
  return tostring(err)
end

local function ms_since(t0)
  return floor((rbe.now() - t0) * 1000 + 0.5)
end

local function result(ok, ev)
  ev.ok = ok and true or false
  if ev.unknown == nil then ev.unknown = false end
  return ev.ok, ev
end

local function pct(x)
  return format("%.3g%%", x * 100)
end

local function show(v)
  if type(v) == "string" then return format("%q", v) end
  if v == json.null then return "null" end
  if type(v) == "table" then
    local ok, s = pcall(json.encode, v)
    return ok and s or tostring(v)
  end
  return tostring(v)
end

-- Does `got` contain everything of `want`?  Returns nil, or the first
-- difference as "json.a.b is X, want Y".
local function json_mismatch(got, want, path)
  if type(want) == "table" and want ~= json.null then
    if type(got) ~= "table" then
      return format("%s is %s, want an object", path, got == nil and "missing" or show(got))
    end
    for k, w in pairs(want) do
      local d = json_mismatch(got[k], w, path .. "." .. tostring(k))
      if d then return d end
    end
    return nil
  end
  if got == want then return nil end
  return format("%s is %s, want %s", path, got == nil and "missing" or show(got), show(want))
end

---------------------------------------------------------------------------
-- http

local HTTP_OPTS = { status = true, json = true, max_ms = true, timeout = true,
  headers = true, method = true, contains = true, auth = true, ca_file = true }

-- health.http(url, {status = 200 | {200, 204}, json = {subset}, contains
-- = "text", max_ms, timeout = "5s", method, headers, auth}) -> ok, ev
function M.http(url, o)
  o = o or {}
  if type(o) ~= "table" then error("health.http: options must be a table", 2) end
  check_fields(o, HTTP_OPTS, "health.http")
  if url == nil then error("health.http: url expected", 2) end
  local shown = http.mask_url(url)
  local method = o.method or "GET"
  local ev = { check = "http", url = shown, method = method }
  local t0 = rbe.now()
  local ok, res = rbe.try(http.request, { method = method, url = url, raise = false,
    timeout = o.timeout or "5s", headers = o.headers, auth = o.auth, ca_file = o.ca_file })
  ev.ms = ms_since(t0)
  if not ok then
    passthrough(res)
    ev.error = errmsg(res)
    -- rbe.http's messages already start with "METHOD URL"
    ev.reason = ev.error:find(method .. " ", 1, true) == 1 and ev.error
      or format("%s %s failed: %s", method, shown, ev.error)
    return result(false, ev)
  end
  ev.status = res.status
  if res.timings and res.timings.total then ev.ms = floor(res.timings.total * 1000 + 0.5) end
  local body = res.body or ""
  ev.body = #body > 300 and (body:sub(1, 300) .. "...") or body
  local want = o.status
  local status_ok
  if want == nil then status_ok = res.status >= 200 and res.status < 300
  elseif type(want) == "table" then
    status_ok = false
    for _, s in ipairs(want) do if s == res.status then status_ok = true end end
  else status_ok = res.status == want end
  if not status_ok then
    ev.reason = format("%s %s -> %d, want %s", method, shown, res.status,
      want == nil and "2xx" or (type(want) == "table" and concat(want, " or ") or tostring(want)))
    return result(false, ev)
  end
  if o.json ~= nil then
    local jok, doc = pcall(json.decode, body)
    if not jok then
      ev.reason = format("%s %s -> %d, body is not JSON", method, shown, res.status)
      return result(false, ev)
    end
    ev.json = doc
    local diff = json_mismatch(doc, o.json, "json")
    if diff then
      ev.reason = format("%s %s -> %d, %s", method, shown, res.status, diff)
      return result(false, ev)
    end
  end
  if o.contains ~= nil and not body:find(o.contains, 1, true) then
    ev.reason = format("%s %s -> %d, body does not contain %q", method, shown, res.status,
      o.contains)
    return result(false, ev)
  end
  if o.max_ms ~= nil and ev.ms > o.max_ms then
    ev.reason = format("%s %s -> %d in %d ms, over %d ms", method, shown, res.status,
      ev.ms, o.max_ms)
    return result(false, ev)
  end
  ev.reason = format("%s %s -> %d in %d ms", method, shown, res.status, ev.ms)
  return result(true, ev)
end

---------------------------------------------------------------------------
-- PostgreSQL (an rbe.pg connection)

local PG_OPTS = { exists = true, missing = true, counts = true, max_ms = true }

local function list_of(v)
  if v == nil then return {} end
  if type(v) == "string" then return { v } end
  return v
end

-- "schema.table" -> "schema"."table" (each part quoted)
local function quote_ident(name)
  local parts = {}
  for part in tostring(name):gmatch("[^.]+") do
    parts[#parts + 1] = '"' .. part:gsub('"', '""') .. '"'
  end
  return concat(parts, ".")
end

local function sorted_keys(t)
  local ks = {}
  for k in pairs(t) do ks[#ks + 1] = k end
  table.sort(ks, function(a, b) return tostring(a) < tostring(b) end)
  return ks
end

-- health.pg(db, {exists = {tables}, missing = {tables}, counts = {table =
-- n | {eq, min, max, where, table}}, max_ms}) -> ok, ev.  Always runs
-- `select 1`.
function M.pg(db, o)
  o = o or {}
  if type(o) ~= "table" then error("health.pg: options must be a table", 2) end
  check_fields(o, PG_OPTS, "health.pg")
  if db == nil or (type(db) ~= "table" and type(db) ~= "userdata") then
    error("health.pg: a connection (rbe.pg.connect) expected, got " .. type(db), 2)
  end
  local ev = { check = "pg", tables = {}, counts = {} }
  local problems = {}
  local t0 = rbe.now()
  local ok, err = rbe.try(function()
    local rows = db:query("select 1 as one")
    if not rows[1] or tonumber(rows[1].one) ~= 1 then
      problems[#problems + 1] = "select 1 did not return 1"
    end
    for _, t in ipairs(list_of(o.exists)) do
      local r = db:query("select to_regclass($1) is not null as present", t)
      local present = r[1] and r[1].present == true
      ev.tables[t] = present
      if not present then problems[#problems + 1] = "table " .. t .. " does not exist" end
    end
    for _, t in ipairs(list_of(o.missing)) do
      local r = db:query("select to_regclass($1) is not null as present", t)
      local present = r[1] and r[1].present == true
      ev.tables[t] = present
      if present then problems[#problems + 1] = "table " .. t .. " still exists" end
    end
    for _, t in ipairs(sorted_keys(o.counts or {})) do
      local want = o.counts[t]
      local spec = type(want) == "table" and want or { eq = want }
      local tbl = spec.table or t
      local sql = "select count(*) as n from " .. quote_ident(tbl)
      if spec.where then sql = sql .. " where " .. spec.where end
      local r = db:query(sql)
      local n = math.tointeger(tonumber(r[1] and r[1].n)) or tonumber(r[1] and r[1].n)
      local label = spec.where and (tbl .. " where " .. spec.where) or tbl
      ev.counts[label] = n
      if spec.eq ~= nil and n ~= spec.eq then
        problems[#problems + 1] = format("%s has %s rows, want %s", label, tostring(n), tostring(spec.eq))
      end
      if spec.min ~= nil and (n or 0) < spec.min then
        problems[#problems + 1] = format("%s has %s rows, want at least %s", label, tostring(n), tostring(spec.min))
      end
      if spec.max ~= nil and (n or 0) > spec.max then
        problems[#problems + 1] = format("%s has %s rows, want at most %s", label, tostring(n), tostring(spec.max))
      end
    end
  end)
  ev.ms = ms_since(t0)
  if not ok then
    passthrough(err)
    ev.error = errmsg(err)
    ev.reason = "postgres: " .. ev.error
    return result(false, ev)
  end
  if o.max_ms ~= nil and ev.ms > o.max_ms then
    problems[#problems + 1] = format("took %d ms, over %d ms", ev.ms, o.max_ms)
  end
  if #problems > 0 then
    ev.reason = "postgres: " .. concat(problems, "; ")
    return result(false, ev)
  end
  ev.reason = format("postgres answers (%d ms)%s", ev.ms,
    (next(ev.tables) or next(ev.counts)) and ", tables and counts as expected" or "")
  return result(true, ev)
end

---------------------------------------------------------------------------
-- Redis (an rbe.redis connection)

-- health.redis(r, {max_ms}) -> ok, ev (PING)
function M.redis(r, o)
  o = o or {}
  if type(o) ~= "table" then error("health.redis: options must be a table", 2) end
  check_fields(o, { max_ms = true }, "health.redis")
  if r == nil or (type(r) ~= "table" and type(r) ~= "userdata") then
    error("health.redis: a connection (rbe.redis.connect) expected, got " .. type(r), 2)
  end
  local ev = { check = "redis" }
  local t0 = rbe.now()
  local ok, reply = rbe.try(r.ping, r)
  ev.ms = ms_since(t0)
  if not ok then
    passthrough(reply)
    ev.error = errmsg(reply)
    ev.reason = "redis: PING failed: " .. ev.error
    return result(false, ev)
  end
  ev.reply = tostring(reply)
  if ev.reply ~= "PONG" then
    ev.reason = "redis: PING answered " .. show(reply)
    return result(false, ev)
  end
  if o.max_ms ~= nil and ev.ms > o.max_ms then
    ev.reason = format("redis: PONG in %d ms, over %d ms", ev.ms, o.max_ms)
    return result(false, ev)
  end
  ev.reason = format("redis: PONG in %d ms", ev.ms)
  return result(true, ev)
end

---------------------------------------------------------------------------
-- error rate from a log

local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = y // 400
  local yoe = y - era * 400
  local doy = (153 * (m + (m > 2 and -3 or 9)) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

-- the seconds of "YYYY-MM-DDTHH:MM:SS" as UTC (and as local time), cached:
-- a log's consecutive lines mostly share their second
local last_stamp, last_utc, last_local
local byte, sub, find = string.byte, string.sub, string.find

local function stamp_time(stamp, utc)
  if stamp ~= last_stamp then
    local y, mo, d, h, mi, s = stamp:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)[T ](%d%d):(%d%d):(%d%d)$")
    if not y then return nil end
    last_stamp, last_local = stamp, nil
    last_utc = days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 86400
      + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s)
  end
  if utc then return last_utc end
  if not last_local then
    local y, mo, d, h, mi, s = stamp:match("^(%d+)%-(%d+)%-(%d+).(%d+):(%d+):(%d+)$")
    last_local = os.time { year = tonumber(y), month = tonumber(mo), day = tonumber(d),
                           hour = tonumber(h), min = tonumber(mi), sec = tonumber(s) }
  end
  return last_local
end

-- The time of a log line starting with an ISO 8601 timestamp (optionally
-- in [brackets]): "2024-06-10T09:00:00.123Z", "2024-06-10 09:00:00+02:00";
-- no zone means local time.  nil when the line has none.
local function iso_time(line)
  local at = byte(line, 1) == 91 and 2 or 1     -- "["
  local stamp = sub(line, at, at + 18)
  local p = at + 19
  local f, c = 0, byte(line, p)
  if c == 46 or c == 44 then                     -- "." or ","
    local e = find(line, "%D", p + 1) or #line + 1
    if e > p + 1 then f = tonumber(sub(line, p + 1, e - 1)) / 10 ^ (e - p - 1) end
    p, c = e, byte(line, e)
  end
  if c == 90 then                                 -- "Z"
    local t = stamp_time(stamp, true)
    return t and t + f
  elseif c == 43 or c == 45 then                  -- "+hh:mm", "-hhmm"
    local sign, zh, zm = line:match("^([+-])(%d%d):?(%d%d)", p)
    local t = sign and stamp_time(stamp, true)
    if not t then return nil end
    local off = tonumber(zh) * 3600 + tonumber(zm) * 60
    return (sign == "+" and t - off or t + off) + f
  end
  local t = stamp_time(stamp, false)
  return t and t + f
end
M.iso_time = iso_time

local RATE_OPTS = { log = true, pattern = true, plain = true, window = true, max = true,
  max_count = true, min_lines = true, total_pattern = true, time = true, now = true,
  max_bytes = true }
local BLOCK = 65536

-- Walk the lines of `path` from the newest back, calling visit(line) until
-- it returns false or max_bytes were read.  Returns bytes read.
local function lines_backwards(path, max_bytes, visit)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local size = f:seek("end")
  local pos, carry, read = size, "", 0
  local stop = false
  while pos > 0 and not stop and read < max_bytes do
    local n = math.min(BLOCK, pos)
    pos = pos - n
    f:seek("set", pos)
    local buf = f:read(n) .. carry
    read = read + n
    local region
    if pos > 0 then
      local i = buf:find("\n", 1, true)
      if not i then
        carry, region = buf, nil
      else
        carry, region = buf:sub(1, i - 1), buf:sub(i + 1)
      end
    else
      carry, region = "", buf
    end
    if region then
      local ls = {}
      for l in region:gmatch("[^\n]+") do ls[#ls + 1] = l end
      for i = #ls, 1, -1 do
        if visit(ls[i]) == false then stop = true break end
      end
    end
  end
  f:close()
  return read
end

-- health.error_rate{log, pattern = "ERROR", plain = true, window = "5m",
-- max = ratio, max_count = n, min_lines = 1, total_pattern, time = fn,
-- max_bytes} -> ok, ev.  Counts the log's lines of the last `window`
-- (by their timestamps) and those matching `pattern`.
function M.error_rate(o)
  if type(o) ~= "table" then error("health.error_rate: options table expected", 2) end
  check_fields(o, RATE_OPTS, "health.error_rate")
  if type(o.log) ~= "string" then error("health.error_rate: log (a file path) expected", 2) end
  if o.max == nil and o.max_count == nil then
    error("health.error_rate: give max (a ratio such as 0.05) or max_count", 2)
  end
  local window = rbe.duration(o.window or "5m")
  local pattern = o.pattern or "ERROR"
  local plain = o.plain ~= false
  local timeof = o.time or iso_time
  local now = o.now or rbe.time()
  local cutoff = now - window
  local min_lines = o.min_lines or 1
  local ev = { check = "error_rate", log = o.log, window = window, pattern = pattern,
               max = o.max, max_count = o.max_count }
  local errors, total, untimed, timed = 0, 0, 0, 0
  local read, rerr = lines_backwards(o.log, o.max_bytes or 16 * 1024 * 1024, function(line)
    local t = timeof(line)
    if not t then untimed = untimed + 1 return true end
    timed = timed + 1
    if t < cutoff then
      -- lines are appended in time order, give or take writers racing:
      -- stop once well before the window
      return t >= cutoff - 60
    end
    if t > now + 60 then return true end   -- from the future: not this window
    if o.total_pattern == nil or line:find(o.total_pattern, 1, plain) then
      total = total + 1
    end
    if line:find(pattern, 1, plain) then errors = errors + 1 end
    return true
  end)
  if not read then
    ev.unknown = true
    ev.error = tostring(rerr)
    ev.reason = "cannot read the log: " .. ev.error
    return result(false, ev)
  end
  ev.errors, ev.total = errors, total
  ev.per_minute = errors / (window / 60)
  if timed == 0 and untimed > 0 then
    ev.unknown = true
    ev.reason = format("no line of %s starts with a timestamp this check understands "
      .. "(give time = function(line) -> epoch)", o.log)
    return result(false, ev)
  end
  local wtext = format("%gs", window)
  if total < min_lines then
    ev.unknown = true
    ev.rate = total > 0 and errors / total or nil
    ev.reason = format("%d line(s) in the last %s of %s, fewer than min_lines %d: no rate",
      total, wtext, o.log, min_lines)
    return result(false, ev)
  end
  ev.rate = errors / total
  local what = format("error rate %s (%d of %d lines in %s)", pct(ev.rate), errors, total, wtext)
  if o.max ~= nil and ev.rate > o.max then
    ev.reason = what .. " > " .. pct(o.max)
    return result(false, ev)
  end
  if o.max_count ~= nil and errors > o.max_count then
    ev.reason = format("%d matching lines in %s > %d (%s)", errors, wtext, o.max_count, what)
    return result(false, ev)
  end
  ev.reason = what .. (o.max and (" <= " .. pct(o.max)) or "")
  return result(true, ev)
end

---------------------------------------------------------------------------
-- Prometheus instant query

local PROM_OPTS = { url = true, query = true, max = true, min = true, timeout = true,
  headers = true, auth = true, time = true, ca_file = true }

local function sample_value(s)
  if type(s) == "number" then return s end
  if s == "+Inf" or s == "Inf" then return math.huge end
  if s == "-Inf" then return -math.huge end
  if s == "NaN" then return 0 / 0 end
  return tonumber(s)
end

local function labels(metric)
  if type(metric) ~= "table" then return "{}" end
  local parts = {}
  for _, k in ipairs(sorted_keys(metric)) do
    parts[#parts + 1] = format('%s="%s"', tostring(k), tostring(metric[k]))
  end
  return "{" .. concat(parts, ",") .. "}"
end

-- health.prometheus{url, query, max, min, timeout = "10s", time, headers,
-- auth} -> ok, ev.  Every series of the result must be within [min, max];
-- an empty result or a NaN is unknown (ok = false, unknown = true).
function M.prometheus(o)
  if type(o) ~= "table" then error("health.prometheus: options table expected", 2) end
  check_fields(o, PROM_OPTS, "health.prometheus")
  if o.url == nil then error("health.prometheus: url (Prometheus' base URL) expected", 2) end
  if type(o.query) ~= "string" then error("health.prometheus: query (PromQL) expected", 2) end
  if o.max == nil and o.min == nil then error("health.prometheus: give max and/or min", 2) end
  local base = rbe.is_secret(o.url) and rbe.reveal(o.url) or tostring(o.url)
  local url = base:find("/api/v1/query$") and base or (base:gsub("/+$", "") .. "/api/v1/query")
  if rbe.is_secret(o.url) then url = rbe.secret(url) end
  local ev = { check = "prometheus", query = o.query, max = o.max, min = o.min,
               url = http.mask_url(url) }
  local t0 = rbe.now()
  local ok, res = rbe.try(http.get, url, { query = { query = o.query, time = o.time },
    raise = false, timeout = o.timeout or "10s", headers = o.headers, auth = o.auth,
    ca_file = o.ca_file })
  ev.ms = ms_since(t0)
  if not ok then
    passthrough(res)
    ev.unknown = true
    ev.error = errmsg(res)
    ev.reason = "prometheus did not answer: " .. ev.error
    return result(false, ev)
  end
  local jok, doc = pcall(json.decode, res.body or "")
  if not jok or type(doc) ~= "table" then
    ev.unknown = true
    ev.reason = format("prometheus answered %d with a body that is not JSON", res.status)
    return result(false, ev)
  end
  if doc.status ~= "success" then
    ev.unknown = true
    ev.error = tostring(doc.error ~= json.null and doc.error or doc.status)
    ev.reason = format("prometheus: query failed (%d, %s): %s", res.status,
      tostring(doc.errorType), ev.error)
    return result(false, ev)
  end
  local data = type(doc.data) == "table" and doc.data or {}
  local series = {}
  if data.resultType == "scalar" and type(data.result) == "table" then
    series[1] = { labels = "scalar", value = sample_value(data.result[2]) }
  elseif data.resultType == "vector" and type(data.result) == "table" then
    for _, s in ipairs(data.result) do
      series[#series + 1] = { labels = labels(s.metric), value = sample_value(s.value and s.value[2]) }
    end
  else
    ev.unknown = true
    ev.reason = "prometheus: result type " .. tostring(data.resultType)
      .. " is not supported (use an instant vector or a scalar)"
    return result(false, ev)
  end
  ev.series = {}
  for i = 1, math.min(#series, 10) do ev.series[i] = series[i] end
  ev.count = #series
  if #series == 0 then
    ev.unknown = true
    ev.reason = "prometheus: no data for " .. o.query
    return result(false, ev)
  end
  local bad, worst = {}, nil
  for _, s in ipairs(series) do
    local v = s.value
    if v == nil or v ~= v then
      ev.unknown = true
      ev.reason = format("prometheus: %s%s is NaN or unreadable", o.query, s.labels)
      return result(false, ev)
    end
    if (o.max ~= nil and v > o.max) or (o.min ~= nil and v < o.min) then
      bad[#bad + 1] = s
    end
    if worst == nil or (o.max ~= nil and v > worst) or (o.max == nil and v < worst) then worst = v end
  end
  ev.value = #series == 1 and series[1].value or worst
  local bounds = (o.min ~= nil and o.max ~= nil) and format("in [%g, %g]", o.min, o.max)
    or (o.max ~= nil and format("<= %g", o.max)) or format(">= %g", o.min)
  if #bad > 0 then
    local shown = {}
    for i = 1, math.min(#bad, 3) do shown[i] = format("%s = %g", bad[i].labels, bad[i].value) end
    ev.reason = format("prometheus: %s: %s%s, want %s", o.query, concat(shown, ", "),
      #bad > 3 and format(" (and %d more)", #bad - 3) or "", bounds)
    return result(false, ev)
  end
  ev.reason = format("prometheus: %s = %g, %s", o.query, ev.value, bounds)
  return result(true, ev)
end

---------------------------------------------------------------------------
-- using results

-- health.assert(ok, ev) -> ev; raises a `health` error carrying the
-- evidence when not ok (a gate shows the reason)
function M.assert(ok, ev)
  if ok then return ev end
  local e = rbe.error("health", type(ev) == "table" and tostring(ev.reason) or tostring(ev))
  e.code = type(ev) == "table" and ev.check or nil
  e.evidence = ev
  e.retryable = true
  error(e, 2)
end

-- health.failed(ok, ev) -> fired, ev: a trigger fires on a measured
-- failure, never on an unknown one (no data, monitoring down)
function M.failed(ok, ev)
  local unknown = type(ev) == "table" and ev.unknown
  return (not ok) and not unknown, ev
end

return M
