-- rbe.redis: Redis for playbooks.  The C core (rbe.redis.core, on hiredis's
-- async API) owns connections, pipelining, timeouts and pub/sub delivery;
-- this module is the public surface: URLs and options, reconnection,
-- method sugar for every command, pipelines and transactions, SCAN
-- iterators, EVALSHA with EVAL fallback, subscriptions and INFO parsing.
--
--   redis.connect(url_or_opts, opts)   -> client   [yields]
--   client:call(cmd, ...) / client:get(k) / client:hset(...)  [yield]
--   client:pipeline(fn, opts) / client:transaction(fn, opts)  [yield]
--   client:scan{match, count, type} / hscan / sscan / zscan   iterators
--   client:unlink_matching(pattern, opts) -> number deleted    [yields]
--   client:eval(script, keys, args)                           [yields]
--   client:subscribe(...) / client:psubscribe(...) -> subscription
--   client:info([section]) -> table                           [yields]
--   client:close()
-- See docs/redis.md.
local rbe = require "rbe"
local core = require "rbe.redis.core"

local type, select, error, pcall, tostring, tonumber, setmetatable, pairs,
  ipairs, rawget = type, select, error, pcall, tostring, tonumber,
  setmetatable, pairs, ipairs, rawget
local unpack, tmove, concat = table.unpack, table.move, table.concat
local is_error, is_secret, reveal, duration =
  rbe.is_error, rbe.is_secret, rbe.reveal, rbe.duration

local M = {}

M.null = rbe.null
M._versions = core._versions
M._stats = core._stats
M._sha1hex = core.sha1hex

local DEFAULT_TIMEOUT = 10          -- seconds per command
local DEFAULT_CONNECT_TIMEOUT = 5

local function usage(fname, msg, level)
  error(fname .. ": " .. msg, (level or 1) + 1)
end

---------------------------------------------------------------------------
-- URLs and options

local function pct_decode(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function parse_db(s, fname)
  local n = math.tointeger(tonumber(s))
  if not n or n < 0 then usage(fname, "bad database number '" .. s .. "'", 4) end
  return n
end

-- userinfo "user:password" or ":password" -> user (or nil), password
local function parse_userinfo(ui, fname)
  local user, pw = ui:match("^([^:]*):(.*)$")
  if not user then
    usage(fname, "put the password after a colon: redis://:PASSWORD@host "
      .. "or redis://USER:PASSWORD@host", 4)
  end
  user = pct_decode(user)
  return user ~= "" and user or nil, rbe.secret(pct_decode(pw))
end

local function parse_query(q, cfg, fname)
  if q == "" then return end
  for kv in q:gmatch("[^&]+") do
    local k, v = kv:match("^([^=]*)=(.*)$")
    if k == "db" then cfg.db = parse_db(v, fname)
    else usage(fname, "unknown URL parameter '" .. (k or kv) .. "' (only db=N)", 3) end
  end
end

-- Parse a redis:// or unix:// URL into a config table.
local function parse_url(url, fname)
  fname = fname or "redis.connect"
  local scheme, rest = url:match("^(%a[%w+.-]*)://(.*)$")
  if not scheme then
    usage(fname, "URL expected (redis://[user:password@]host:port/db or "
      .. "unix:///path?db=N)", 3)
  end
  scheme = scheme:lower()
  if scheme == "rediss" then
    local e = rbe.error("redis", fname .. ": rediss:// (TLS) is not "
      .. "supported: Debian 12's hiredis 0.14 has no TLS, and rbe never "
      .. "falls back to plaintext; reach the server through a local TLS "
      .. "tunnel (stunnel, spiped, an SSH forward) or a unix socket")
    e.code = "ENOTSUP"
    error(e, 3)
  end
  local cfg = { db = 0 }
  local body, query = rest:match("^([^?]*)%??(.*)$")
  if scheme == "redis" then
    local at = body:match("^.*()@")
    if at then
      cfg.user, cfg.password = parse_userinfo(body:sub(1, at - 1), fname)
      body = body:sub(at + 1)
    end
    local hostport, path = body:match("^([^/]*)(.*)$")
    local host, port = hostport:match("^%[([^%]]+)%]:?(%d*)$")
    if not host then host, port = hostport:match("^([^:]*):?(%d*)$") end
    if not host or host == "" then usage(fname, "no host in the URL", 3) end
    cfg.host = host
    cfg.port = port ~= "" and tonumber(port) or 6379
    if path ~= "" and path ~= "/" then cfg.db = parse_db(path:sub(2), fname) end
  elseif scheme == "unix" then
    local at = body:match("^.*()@")
    if at then
      cfg.user, cfg.password = parse_userinfo(body:sub(1, at - 1), fname)
      body = body:sub(at + 1)
    end
    if body:sub(1, 1) ~= "/" then
      usage(fname, "unix socket URLs look like unix:///path/to/redis.sock?db=N", 3)
    end
    cfg.path = pct_decode(body)
  else
    usage(fname, "unsupported URL scheme '" .. scheme .. "' (redis:// or unix://)", 3)
  end
  parse_query(query, cfg, fname)
  return cfg
end
M._parse_url = parse_url

-- The target as shown in messages: the password is always ***.
local function describe(cfg)
  local ui = ""
  if cfg.password then ui = (cfg.user or "") .. ":***@"
  elseif cfg.user then ui = cfg.user .. "@" end
  if cfg.path then
    return "unix://" .. ui .. cfg.path .. (cfg.db ~= 0 and ("?db=" .. cfg.db) or "")
  end
  local host = cfg.host:find(":", 1, true) and ("[" .. cfg.host .. "]") or cfg.host
  return ("redis://%s%s:%d/%d"):format(ui, host, cfg.port, cfg.db)
end

local KNOWN = {
  url = true, host = true, port = true, path = true, user = true,
  username = true, password = true, db = true, name = true, timeout = true,
  connect_timeout = true, reconnect = true,
}

local function opt_duration(v, name, fname)
  if v == false or v == 0 then return false end
  local ok, d = pcall(duration, v)
  if not ok then usage(fname, "option '" .. name .. "': " .. tostring(d), 4) end
  return d
end

-- Merge url_or_opts and opts into one config table.
local function build_cfg(target, opts, fname)
  local cfg
  local t = type(target)
  if t == "string" or is_secret(target) then
    cfg = parse_url(reveal(target), fname)
  elseif t == "table" then
    cfg = target.url and parse_url(reveal(target.url), fname) or { db = 0 }
  else
    usage(fname, "URL or options table expected, got " .. t, 3)
  end
  if opts ~= nil and type(opts) ~= "table" then
    usage(fname, "options table expected, got " .. type(opts), 3)
  end
  -- the options of a table target, then opts over them (neither changed)
  local merged = {}
  if t == "table" then
    for k, v in pairs(target) do if k ~= "url" then merged[k] = v end end
  end
  for k, v in pairs(opts or {}) do merged[k] = v end
  opts = merged
  for k in pairs(opts) do
    if not KNOWN[k] then usage(fname, "unknown option '" .. tostring(k) .. "'", 3) end
  end
  if opts.host then cfg.host, cfg.path = opts.host, nil end
  if opts.path then cfg.path, cfg.host = opts.path, nil end
  if opts.port then cfg.port = math.tointeger(opts.port) end
  if opts.db then cfg.db = parse_db(tostring(opts.db), fname) end
  local user = opts.user or opts.username
  if user then cfg.user = reveal(user) end
  if opts.password then cfg.password = rbe.secret(opts.password) end
  if opts.name then cfg.name = opts.name end
  if not cfg.host and not cfg.path then cfg.host = "127.0.0.1" end
  cfg.port = cfg.port or 6379
  if cfg.user and not cfg.password then
    usage(fname, "user '" .. cfg.user .. "' needs a password", 3)
  end
  local to = opts.timeout
  if to == nil then cfg.timeout = DEFAULT_TIMEOUT
  else cfg.timeout = opt_duration(to, "timeout", fname) end
  local ct = opts.connect_timeout
  if ct == nil then cfg.connect_timeout = DEFAULT_CONNECT_TIMEOUT
  else cfg.connect_timeout = opt_duration(ct, "connect_timeout", fname) end
  cfg.reconnect = opts.reconnect ~= false
  cfg.desc = describe(cfg)
  return cfg
end
M._build_cfg = build_cfg

---------------------------------------------------------------------------
-- the client

local Client = {}
local client_mt = { __name = "rbe.redis.client" }

local function closed_error(self, cause)
  local msg = self._desc .. ": client is closed"
  if cause then msg = msg .. " (" .. tostring(cause.message) .. ")" end
  if not self._explicitly_closed then msg = msg .. "; reconnect = false" end
  local e = rbe.error("closed", msg)
  e.code = "CLOSED"
  return e
end

-- The live connection, reconnecting when allowed.  Opening does not wait:
-- the handshake is pipelined with the command that follows.
local function conn_of(self)
  local c = self._conn
  if c and c:alive() then return c end
  if self._explicitly_closed then error(closed_error(self), 3) end
  if c and not self._cfg.reconnect then error(closed_error(self, c:error()), 3) end
  c = core.open(self._cfg)
  self._conn = c
  return c
end

-- Timeouts of blocking commands: their own block time plus the client's
-- timeout; a block of 0 (forever) means no timeout.
local function last_secs(...) return tonumber((select(select("#", ...), ...))) end
local function first_secs(...) return tonumber((...)) end
local function block_option_secs(...)
  for i = 1, select("#", ...) - 1 do
    local a = select(i, ...)
    if type(a) == "string" and a:upper() == "BLOCK" then
      local ms = tonumber((select(i + 1, ...)))
      return ms and ms / 1000
    end
  end
end
local BLOCKING = {}
for name, f in pairs {
  BLPOP = last_secs, BRPOP = last_secs, BRPOPLPUSH = last_secs,
  BLMOVE = last_secs, BZPOPMIN = last_secs, BZPOPMAX = last_secs,
  BLMPOP = first_secs, BZMPOP = first_secs,
  XREAD = block_option_secs, XREADGROUP = block_option_secs,
  WAIT = function(_, ms) ms = tonumber(ms); return ms and ms / 1000 end,
} do
  BLOCKING[name] = f
  BLOCKING[name:lower()] = f
end

local function blocking_timeout(self, f, ...)
  local secs = f(...)
  local base = self._cfg.timeout
  if secs == nil then return base end
  if secs <= 0 or not base then return false end
  return base + secs
end

local function call(self, cmd, ...)
  local c = conn_of(self)
  local f = BLOCKING[cmd]
  if f then return c:callblock(blocking_timeout(self, f, ...), cmd, ...) end
  return c:call(cmd, ...)
end

-- client:call(cmd, ...) -> reply  [yields]
-- client:call{cmd, args..., timeout = d} -> reply: per-call timeout
function Client:call(cmd, ...)
  if type(cmd) == "table" then
    local n = #cmd
    for k in pairs(cmd) do
      if not (math.type(k) == "integer" and k >= 1 and k <= n) and k ~= "timeout" then
        usage("redis call", "unknown option '" .. tostring(k) .. "'", 2)
      end
    end
    local t = cmd.timeout
    if t == nil then return call(self, unpack(cmd, 1, n)) end
    t = opt_duration(t, "timeout", "redis call")
    local c = conn_of(self)
    if BLOCKING[cmd[1]] then return c:callblock(t, unpack(cmd, 1, n)) end
    return c:callt(t, unpack(cmd, 1, n))
  end
  if type(cmd) ~= "string" then
    usage("redis call", "command name expected, got " .. type(cmd), 2)
  end
  return call(self, cmd, ...)
end

-- client:select(db): also the database used after a reconnect
function Client:select(db)
  local n = parse_db(tostring(db), "redis select")
  local r = call(self, "SELECT", n)
  self._cfg.db = n
  self._cfg.desc = describe(self._cfg)
  self._desc = self._cfg.desc
  return r
end

---------------------------------------------------------------------------
-- pipelines

local function sugar_name(k)
  return type(k) == "string" and k:match("^%a%w*$") and k:upper() or nil
end

local function pipe_timeout(opts, fname)
  if opts == nil then return nil end
  if type(opts) ~= "table" then usage(fname, "options table expected", 3) end
  for k in pairs(opts) do
    if k ~= "timeout" then usage(fname, "unknown option '" .. tostring(k) .. "'", 3) end
  end
  if opts.timeout == nil then return nil end
  return opt_duration(opts.timeout, "timeout", fname)
end

-- client:pipeline(fn[, {timeout = d}]) -> replies (array, replies.n)
-- fn(p) queues commands with p:set(...), p:call("GET", k), ...; they are
-- sent in one go.  An error reply is an error object in its slot.
function Client:pipeline(fn, opts)
  if type(fn) ~= "function" then
    usage("redis pipeline", "function expected, got " .. type(fn), 2)
  end
  local timeout = pipe_timeout(opts, "redis pipeline")
  local p = core.pipeline()
  fn(p)
  return conn_of(self):pipeline(p, timeout)
end

-- client:transaction(fn[, opts]) -> EXEC's replies: MULTI, fn's commands
-- and EXEC sent together.  Raises EXECABORT when a command was rejected;
-- returns rbe.null when a WATCHed key changed.
function Client:transaction(fn, opts)
  if type(fn) ~= "function" then
    usage("redis transaction", "function expected, got " .. type(fn), 2)
  end
  local timeout = pipe_timeout(opts, "redis transaction")
  local p = core.pipeline()
  p:call("MULTI")
  fn(p)
  p:call("EXEC")
  local replies = conn_of(self):pipeline(p, timeout)
  local exec = replies[replies.n]
  if is_error(exec) then
    local errs = {}
    for i = 2, replies.n - 1 do
      if is_error(replies[i]) then errs[#errs + 1] = replies[i] end
    end
    if errs[1] then
      exec.message = exec.message .. " (first rejected command: "
        .. tostring(errs[1].message) .. ")"
      exec.errors = errs
    end
    error(exec, 2)
  end
  return exec
end

---------------------------------------------------------------------------
-- SCAN iterators

local SCAN_OPTS = { match = true, count = true, type = true, unique = true, batch = true }

-- cmd: "SCAN", "SSCAN", "HSCAN", "ZSCAN"; key: nil for SCAN; step: 1 for
-- keys/members, 2 for field-value and member-score pairs.
local function scan_iter(self, fname, cmd, key, opts, step)
  if opts ~= nil and type(opts) ~= "table" then usage(fname, "options table expected", 3) end
  opts = opts or {}
  for k in pairs(opts) do
    if not SCAN_OPTS[k] or (k == "type" and cmd ~= "SCAN") then
      usage(fname, "unknown option '" .. tostring(k) .. "'", 3)
    end
  end
  local extra = {}
  if opts.match ~= nil then extra[#extra + 1] = "MATCH"; extra[#extra + 1] = opts.match end
  if opts.count ~= nil then extra[#extra + 1] = "COUNT"; extra[#extra + 1] = opts.count end
  if opts.type ~= nil then extra[#extra + 1] = "TYPE"; extra[#extra + 1] = opts.type end
  local seen = opts.unique ~= false and {} or nil
  local batch = opts.batch
  local cursor, started = "0", false
  local page, i = nil, 0
  local function fetch()
    local res
    if key == nil then res = call(self, cmd, cursor, unpack(extra))
    else res = call(self, cmd, key, cursor, unpack(extra)) end
    cursor, page, i = res[1], res[2], 0
    started = true
  end
  if batch then
    return function()
      while true do
        if started and cursor == "0" then return nil end
        fetch()
        local out = page
        if seen then
          out = {}
          for j = 1, #page, step do
            local k = page[j]
            if not seen[k] then
              seen[k] = true
              for s = 0, step - 1 do out[#out + 1] = page[j + s] end
            end
          end
        end
        if #out > 0 then return out end
      end
    end
  end
  return function()
    while true do
      if page and i < #page then
        local k = page[i + 1]
        local v = page[i + 2]
        i = i + step
        if not seen or not seen[k] then
          if seen then seen[k] = true end
          if step == 1 then return k end
          if cmd == "ZSCAN" then return k, tonumber(v) end
          return k, v
        end
      else
        if started and cursor == "0" then return nil end
        fetch()
      end
    end
  end
end

-- client:scan{match, count, type, unique, batch} -> iterator of keys
function Client:scan(opts)
  return scan_iter(self, "redis scan", "SCAN", nil, opts, 1)
end

-- client:sscan(key, opts) -> iterator of members
function Client:sscan(key, opts)
  return scan_iter(self, "redis sscan", "SSCAN", key, opts, 1)
end

-- client:hscan(key, opts) -> iterator of field, value
function Client:hscan(key, opts)
  return scan_iter(self, "redis hscan", "HSCAN", key, opts, 2)
end

-- client:zscan(key, opts) -> iterator of member, score (a number)
function Client:zscan(key, opts)
  return scan_iter(self, "redis zscan", "ZSCAN", key, opts, 2)
end

-- client:unlink_matching(pattern[, {count = 1000, type = t}]) -> number of
-- keys removed.  SCAN + UNLINK, never KEYS, so the server never blocks for
-- long.  Each page's UNLINK is sent by a helper task right after the SCAN
-- for the next page: we read that page while the server unlinks the last
-- one, so the server never waits for us.
function Client:unlink_matching(pattern, opts)
  if type(pattern) ~= "string" then
    usage("redis unlink_matching", "pattern expected, got " .. type(pattern), 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "count" and k ~= "type" then
      usage("redis unlink_matching", "unknown option '" .. tostring(k) .. "'", 2)
    end
  end
  local tail = { "MATCH", pattern, "COUNT", opts.count or 1000 }
  if opts.type then tail[5] = "TYPE"; tail[6] = opts.type end
  local ntail = #tail
  local removed = 0
  local function unlink(keys)
    local n = call(self, "UNLINK", unpack(keys))
    removed = removed + n       -- after the wait: other tasks add too
  end
  local inflight = {}                   -- UNLINK tasks, oldest first
  local ok, err = pcall(function()
    local cursor = "0"
    repeat
      local res = call(self, "SCAN", cursor, unpack(tail, 1, ntail))
      cursor = res[1]
      local keys = res[2]
      if #keys > 0 then
        if #inflight >= 2 then table.remove(inflight, 1):join() end
        inflight[#inflight + 1] = rbe.spawn(unlink, keys)
      end
    until cursor == "0"
    while inflight[1] do table.remove(inflight, 1):join() end
  end)
  if not ok then
    -- cancel the helpers and let them unwind before raising
    for _, t in ipairs(inflight) do t:cancel() end
    while true do
      local live = {}
      for _, t in ipairs(inflight) do
        if not t:done() then live[#live + 1] = t end
      end
      if not live[1] or not pcall(rbe.wait_any, live, true) then break end
    end
    for _, t in ipairs(inflight) do t:error() end   -- observed
    error(err, 0)
  end
  return removed
end

---------------------------------------------------------------------------
-- scripts

local shas = {}

-- client:eval(script, keys, args) -> the script's reply  [yields]
-- EVALSHA first; on NOSCRIPT, EVAL (which also caches the script).
function Client:eval(script, keys, args)
  if type(script) ~= "string" then
    usage("redis eval", "script string expected, got " .. type(script), 2)
  end
  keys, args = keys or {}, args or {}
  local sha = shas[script]
  if not sha then sha = core.sha1hex(script); shas[script] = sha end
  local nk, na = #keys, #args
  local argv = { "EVALSHA", sha, nk }
  tmove(keys, 1, nk, 4, argv)
  tmove(args, 1, na, 4 + nk, argv)
  local n = 3 + nk + na
  local ok, res = pcall(call, self, unpack(argv, 1, n))
  if ok then return res end
  if is_error(res) and res.code == "NOSCRIPT" then
    argv[1], argv[2] = "EVAL", script
    return call(self, unpack(argv, 1, n))
  end
  error(res, 0)
end

---------------------------------------------------------------------------
-- INFO

local function is_map(v)
  if not v:find("=", 1, true) then return false end
  for part in (v .. ","):gmatch("([^,]*),") do
    if not part:match("^[%w_%-]+=") then return false end
  end
  return true
end

local function info_value(v)
  if v:match("^%-?%d+%.?%d*$") then return tonumber(v) end
  if is_map(v) then
    local t = {}
    for part in (v .. ","):gmatch("([^,]*),") do
      local k, x = part:match("^([^=]+)=(.*)$")
      t[k] = info_value(x)
    end
    return t
  end
  return v
end

-- Parse INFO's text into {field = value}: numbers become numbers, and
-- "k=v,k=v" values (db0, cmdstat_*) become tables.
local function parse_info(text)
  local t = {}
  for line in text:gmatch("[^\r\n]+") do
    if line:sub(1, 1) ~= "#" then
      local k, v = line:match("^([^:]+):(.*)$")
      if k then t[k] = info_value(v) end
    end
  end
  return t
end
M._parse_info = parse_info

-- client:info([section]) -> table of INFO fields  [yields]
function Client:info(section)
  if section == nil then return parse_info(call(self, "INFO")) end
  return parse_info(call(self, "INFO", section))
end

---------------------------------------------------------------------------
-- pub/sub

local Sub = {}
local sub_mt = { __name = "rbe.redis.subscription", __index = Sub }

local function sub_conn(s)
  local c = s._conn
  if c and c:alive() then return c end
  -- messages published while the connection was down are lost: say so
  -- once (retryable) before reconnecting
  if c and not s._closed and s._reported ~= c then
    s._reported = c
    error(c:error() or rbe.error("redis", s._desc .. ": connection lost"), 3)
  end
  if s._closed then
    local e = rbe.error("closed", s._desc .. ": subscription is closed")
    e.code = "CLOSED"
    error(e, 3)
  end
  if c and not s._cfg.reconnect then
    local e = rbe.error("closed", s._desc .. ": subscription is closed ("
      .. tostring((c:error() or {}).message) .. "); reconnect = false")
    e.code = "CLOSED"
    error(e, 3)
  end
  c = core.open(s._cfg)
  s._conn = c
  c:callt(s._cfg.connect_timeout, "PING")
  -- a new connection: subscribe again to what we had
  local ch, pt = {}, {}
  for name in pairs(s.channels) do ch[#ch + 1] = name end
  for name in pairs(s.patterns) do pt[#pt + 1] = name end
  if #ch > 0 then s:_send("SUBSCRIBE", ch, c) end
  if #pt > 0 then s:_send("PSUBSCRIBE", pt, c) end
  return c
end

local function shape(m)
  local kind = m[1]
  if kind == "message" then
    return { kind = "message", channel = m[2], payload = m[3] }
  elseif kind == "pmessage" then
    return { kind = "pmessage", pattern = m[2], channel = m[3], payload = m[4] }
  end
end

-- Send (P)(UN)SUBSCRIBE and wait for every confirmation, keeping the
-- messages that arrive meanwhile.
function Sub:_send(cmd, names, conn)
  local c = conn or sub_conn(self)
  local want, left = {}, 0
  for _, n in ipairs(names) do
    want[n] = (want[n] or 0) + 1
    left = left + 1
  end
  local kind = cmd:lower()
  if not c:subscribe(cmd, unpack(names)) then left = 0 end
  local deadline = self._cfg.timeout and rbe.now() + self._cfg.timeout
  while left > 0 do
    local remaining = deadline and math.max(deadline - rbe.now(), 0.001) or false
    local m = c:message(remaining)
    if m == nil then
      c:close()
      local e = rbe.error("timeout", ("%s: no confirmation of %s within %gs; "
        .. "connection closed"):format(self._desc, cmd, self._cfg.timeout))
      e.code = "ETIMEDOUT"
      e.retryable = true
      error(e, 3)
    end
    local name = m[2]
    if m[1] == kind and want[name] and want[name] > 0 then
      want[name] = want[name] - 1
      left = left - 1
    else
      local msg = shape(m)
      if msg then self._buf[#self._buf + 1] = msg end
    end
  end
  local set = (cmd == "SUBSCRIBE" or cmd == "UNSUBSCRIBE") and self.channels or self.patterns
  local on = cmd == "SUBSCRIBE" or cmd == "PSUBSCRIBE"
  for _, n in ipairs(names) do set[n] = on or nil end
end

local function name_list(fname, set, ...)
  local names = { ... }
  for i, n in ipairs(names) do
    if type(n) ~= "string" then usage(fname, "argument #" .. i .. ": string expected", 3) end
  end
  if select("#", ...) == 0 and set then
    for n in pairs(set) do names[#names + 1] = n end
  end
  return names
end

-- sub:subscribe(channel...) / sub:psubscribe(pattern...): add more
function Sub:subscribe(...)
  local names = name_list("subscription:subscribe", nil, ...)
  if #names == 0 then usage("subscription:subscribe", "channel name expected", 2) end
  self:_send("SUBSCRIBE", names)
  return self
end

function Sub:psubscribe(...)
  local names = name_list("subscription:psubscribe", nil, ...)
  if #names == 0 then usage("subscription:psubscribe", "pattern expected", 2) end
  self:_send("PSUBSCRIBE", names)
  return self
end

-- sub:unsubscribe([channel...]) / sub:punsubscribe([pattern...]): stop
-- (everything of that kind when no name is given)
function Sub:unsubscribe(...)
  local names = name_list("subscription:unsubscribe", self.channels, ...)
  if #names > 0 then self:_send("UNSUBSCRIBE", names) end
  return self
end

function Sub:punsubscribe(...)
  local names = name_list("subscription:punsubscribe", self.patterns, ...)
  if #names > 0 then self:_send("PUNSUBSCRIBE", names) end
  return self
end

-- sub:next([timeout]) -> message, or nil when timeout elapsed  [yields]
-- message = {kind = "message"|"pmessage", channel, payload, pattern}
function Sub:next(timeout)
  local buf = self._buf
  if buf[1] then return table.remove(buf, 1) end
  local deadline
  if timeout ~= nil and timeout ~= false then
    deadline = rbe.now() + opt_duration(timeout, "timeout", "subscription:next")
  end
  while true do
    local c = sub_conn(self)
    if buf[1] then return table.remove(buf, 1) end
    local remaining = false
    if deadline then
      remaining = deadline - rbe.now()
      if remaining <= 0 then return nil end
    end
    local ok, m = pcall(c.message, c, remaining)
    if not ok then
      if not c:alive() then self._reported = c end
      error(m, 0)
    end
    if m == nil then return nil end
    local msg = shape(m)
    if msg then return msg end
  end
end

-- sub:close(): closes the dedicated connection; twice is fine
function Sub:close()
  self._closed = true
  if self._conn then self._conn:close() end
end

sub_mt.__call = function(s) return s:next() end
sub_mt.__close = function(s) s:close() end
sub_mt.__tostring = function(s)
  return "redis subscription " .. s._desc .. (s._closed and " (closed)" or "")
end

local function open_sub(self, cmd, fname, ...)
  local names = name_list(fname, nil, ...)
  if #names == 0 then usage(fname, "at least one name expected", 3) end
  local s = setmetatable({
    _cfg = self._cfg, _desc = self._desc, _buf = {},
    channels = {}, patterns = {},
  }, sub_mt)
  local ok, err = pcall(function()
    sub_conn(s)
    s:_send(cmd, names)
  end)
  if not ok then
    s:close()
    error(err, 0)
  end
  -- the fourth value closes the subscription when a for loop ends
  return s, nil, nil, s
end

-- client:subscribe(channel...) -> subscription (an iterator of messages)
function Client:subscribe(...)
  return open_sub(self, "SUBSCRIBE", "redis subscribe", ...)
end

-- client:psubscribe(pattern...) -> subscription
function Client:psubscribe(...)
  return open_sub(self, "PSUBSCRIBE", "redis psubscribe", ...)
end

---------------------------------------------------------------------------
-- life cycle

-- client:close(): pending commands fail with a `closed` error; closing
-- twice is fine.  The client does not reconnect after close.
function Client:close()
  self._explicitly_closed = true
  local c = self._conn
  if c then c:close() end
end

-- client:connected() -> boolean
function Client:connected()
  local c = self._conn
  return c ~= nil and c:alive()
end

-- client:get(k), client:hset(...), ...: one function per command name,
-- made on first use
client_mt.__index = Client
setmetatable(Client, { __index = function(_, k)
  local name = sugar_name(k)
  if not name then return nil end
  local m = function(s, ...) return call(s, name, ...) end
  rawset(Client, k, m)
  return m
end })
client_mt.__close = function(self) self:close() end
client_mt.__tostring = function(self)
  local st = self._explicitly_closed and "closed"
    or (self._conn and self._conn:state()) or "not connected"
  return "redis client " .. self._desc .. " (" .. st .. ")"
end

-- redis.connect(url_or_opts[, opts]) -> client  [yields]
-- Connects, authenticates and selects the database before returning.
function M.connect(target, opts)
  local cfg = build_cfg(target, opts, "redis.connect")
  local self = setmetatable({ _cfg = cfg, _desc = cfg.desc,
    _explicitly_closed = false }, client_mt)
  local c = core.open(cfg)
  self._conn = c
  local ok, err = pcall(c.callt, c, cfg.connect_timeout, "PING")
  if not ok then
    local cause = c:error()
    c:close()
    if cause and cause.kind == "timeout" then
      cause = rbe.error("timeout", ("cannot connect to %s: no answer within "
        .. "%gs"):format(cfg.desc, cfg.connect_timeout))
      cause.code, cause.retryable = "ETIMEDOUT", true
    end
    error(cause or err, 2)
  end
  return self
end

return M
