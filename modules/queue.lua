-- queue: pause and resume Bull and BullMQ job queues in Redis, read their
-- counts and wait until they are idle; pause through a service's HTTP
-- endpoints (an app's pause-all route, bull-board) when Redis is not at
-- hand.  Pause and resume are each ONE server-side script (EVAL), which
-- also reads the queue's keys to tell its layout, so a producer adding
-- jobs meanwhile can never land between two commands:
--
--   bullmq6  BullMQ >= 6: jobs stay in `wait`; `meta.paused` stops the
--            workers; the `marker` is removed on pause and set on resume
--   bullmq5  BullMQ 5: RENAME wait -> paused, `meta.paused`, marker key
--   bullmq4  BullMQ <= 4: RENAME, `meta.paused`, markers in the wait list
--   bull     Bull 3/4: RENAME, `meta-paused`, `meta.paused`, PUBLISH
--
-- Which one a queue uses comes from `meta.version` ("bullmq:6.7.0"), else
-- from which keys exist.  The module owns no connection: callers pass an
-- rbe.redis client (or, for the *_step builders, a URL opened per call).
--
--   local q = queue.open(r, "notifications", {prefix = "bull"})
--   q:pause() / q:resume() -> {queue, layout, was_paused, moved}  [yields]
--   q:status() -> {paused, waiting, active, delayed, failed, ...}  [yields]
--   q:wait_idle{timeout} -> status                                 [yields]
--   queue.list(r, {prefix}) -> names                               [yields]
--   queue.http(opts) / queue.bull_board(url, opts)
--   queue.pause_step{...}, queue.resume_step{...},
--   queue.http_pause_step{...}, queue.bull_board_step{...}
--
-- See docs/modules/queue.md.
local rbe = require "rbe"
local kit = require "rbe.stepkit"

local type, pairs, ipairs, error, tostring, setmetatable, getmetatable, tonumber =
  type, pairs, ipairs, error, tostring, setmetatable, getmetatable, tonumber
local format = string.format

local M = {}

M.LAYOUTS = { bullmq6 = true, bullmq5 = true, bullmq4 = true, bull = true }

---------------------------------------------------------------------------
-- the server-side script (Redis runs Lua 5.1)
--
-- KEYS: 1 wait, 2 paused, 3 meta, 4 prioritized, 5 events, 6 delayed,
--       7 marker, 8 meta-paused, 9 active, 10 id, 11 completed, 12 failed,
--       13 waiting-children, 14 priority (Bull), 15 stalled-check
-- ARGV: 1 "pause" | "resume" | "status"; 2 forced layout or ""; 3 "1" to
--       emit the paused/resumed event; 4 and 5 Bull's event channels
-- Returns {layout ("" when no queue is there), version, was_paused,
--          moved, wait, paused, prioritized, active, delayed, failed,
--          completed, waiting_children, paused_now}
M.SCRIPT = [[
local K, rcall = KEYS, redis.call
local wait, paused, meta, prioritized, events = K[1], K[2], K[3], K[4], K[5]
local delayed, marker, metapaused, active = K[6], K[7], K[8], K[9]
local op, forced, emit = ARGV[1], ARGV[2], ARGV[3] == "1"

local function exists(k) return rcall("EXISTS", k) == 1 end
local function is_hash(k) return rcall("TYPE", k)["ok"] == "hash" end

local function detect()
  local version = ""
  if is_hash(meta) then version = rcall("HGET", meta, "version") or "" end
  local lib, major = string.match(version, "^([^:]+):(%d+)")
  if lib == "bullmq" then
    major = tonumber(major)
    if major >= 6 then return "bullmq6", version end
    if major == 5 then return "bullmq5", version end
    return "bullmq4", version
  end
  if lib then return "bullmq5", version end
  if exists(metapaused) then return "bull", version end
  if exists(events) or exists(marker) or exists(prioritized)
     or (is_hash(meta) and rcall("HEXISTS", meta, "opts.maxLenEvents") == 1) then
    return "bullmq5", version
  end
  for _, k in ipairs({ wait, paused, active, K[10], delayed, K[11], K[12], K[14], K[15] }) do
    if exists(k) then return "bull", version end
  end
  return "", version
end

local layout, version = detect()
if forced ~= "" then layout = forced end
if layout == "" then return { "", version } end

local function is_paused()
  if layout == "bull" and exists(metapaused) then return true end
  return is_hash(meta) and rcall("HEXISTS", meta, "paused") == 1
end

-- move src's elements to the older (right) end of dst
local function append_older(src, dst)
  if not exists(src) then return 0 end
  if not exists(dst) then
    rcall("RENAME", src, dst)
    return rcall("LLEN", dst)
  end
  local n = 0
  while true do
    local chunk = rcall("LRANGE", src, 0, 999)
    if #chunk == 0 then break end
    rcall("RPUSH", dst, unpack(chunk))
    rcall("LTRIM", src, #chunk, -1)
    n = n + #chunk
  end
  return n
end

-- move src's elements to the newer (left) end of dst, keeping their order
local function prepend_newer(src, dst)
  if not exists(src) then return 0 end
  if not exists(dst) then
    rcall("RENAME", src, dst)
    return rcall("LLEN", dst)
  end
  local n = 0
  while true do
    local chunk = rcall("LRANGE", src, -1000, -1)
    local c = #chunk
    if c == 0 then break end
    local rev = {}
    for i = c, 1, -1 do rev[#rev + 1] = chunk[i] end
    rcall("LPUSH", dst, unpack(rev))
    rcall("LTRIM", src, 0, -(c + 1))
    n = n + c
  end
  return n
end

local function event(name)
  if not emit then return end
  if layout == "bull" then
    rcall("PUBLISH", name == "paused" and ARGV[4] or ARGV[5], name)
  else
    rcall("XADD", events, "*", "event", name)
  end
end

-- what BullMQ's own resume does to wake its workers
local function wake()
  if layout == "bullmq4" then
    if rcall("ZCARD", prioritized) > 0 and rcall("LLEN", wait) == 0 then
      rcall("LPUSH", wait, "0:0")
    end
  elseif layout ~= "bull" then
    if rcall("LLEN", wait) + rcall("ZCARD", prioritized) > 0 then
      rcall("ZADD", marker, 0, "0")
    else
      local first = rcall("ZRANGE", delayed, 0, 0, "WITHSCORES")
      if first[2] then rcall("ZADD", marker, tonumber(first[2]) / 0x1000, "1") end
    end
  end
end

local was = is_paused()
local moved = 0
if op == "pause" then
  if layout ~= "bullmq6" then moved = prepend_newer(wait, paused) end
  if not was then
    if layout == "bull" then rcall("SET", metapaused, 1) end
    rcall("HSET", meta, "paused", 1)
    if layout ~= "bull" and layout ~= "bullmq4" then rcall("DEL", marker) end
    event("paused")
  end
elseif op == "resume" then
  moved = append_older(paused, wait)
  if was then
    if layout == "bull" then rcall("DEL", metapaused) end
    rcall("HDEL", meta, "paused")
  end
  if was or moved > 0 then wake() end
  if was then event("resumed") end
end

local prio = 0
if layout ~= "bull" then prio = rcall("ZCARD", prioritized) end
return { layout, version, was and 1 or 0, moved, rcall("LLEN", wait),
  rcall("LLEN", paused), prio, rcall("LLEN", active), rcall("ZCARD", delayed),
  rcall("ZCARD", K[12]), rcall("ZCARD", K[11]), rcall("ZCARD", K[13]),
  is_paused() and 1 or 0 }
]]

local KEY_TYPES = { "wait", "paused", "meta", "prioritized", "events", "delayed",
  "marker", "meta-paused", "active", "id", "completed", "failed",
  "waiting-children", "priority", "stalled-check" }

---------------------------------------------------------------------------
-- helpers

local qerror = kit.error_for("queue")

local function check_fields(t, known, fname, level)
  for k in pairs(t) do
    if not known[k] then
      error(format("%s: unknown option '%s'", fname, tostring(k)), (level or 2) + 1)
    end
  end
end

local function is_redis_client(v)
  return type(v) == "table" and type(v.call) == "function" and type(v.eval) == "function"
end

---------------------------------------------------------------------------
-- a queue handle

local Queue = {}
Queue.__index = Queue
Queue.__name = "queue"

local OPEN_OPTS = { prefix = true, layout = true, emit = true }

-- queue.open(r, name[, {prefix = "bull", layout, emit = true}]) -> q
-- No I/O: the layout is read by each call, inside its script.
function M.open(r, name, opts)
  if not is_redis_client(r) then
    error("queue.open: an rbe.redis client expected, got " .. type(r), 2)
  end
  if type(name) ~= "string" or name == "" then
    error("queue.open: queue name expected, got " .. type(name), 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then error("queue.open: options table expected", 2) end
  check_fields(opts, OPEN_OPTS, "queue.open")
  local prefix = opts.prefix or "bull"
  if type(prefix) ~= "string" or prefix == "" then
    error("queue.open: prefix must be a non-empty string", 2)
  end
  if opts.layout ~= nil and not M.LAYOUTS[opts.layout] then
    error(format("queue.open: unknown layout '%s' (bullmq6, bullmq5, bullmq4 or bull)",
      tostring(opts.layout)), 2)
  end
  local base = prefix .. ":" .. name
  local keys = {}
  for i, t in ipairs(KEY_TYPES) do keys[i] = base .. ":" .. t end
  return setmetatable({ redis = r, name = name, prefix = prefix, base = base,
    layout = opts.layout, emit = opts.emit ~= false, _keys = keys }, Queue)
end

Queue.__tostring = function(q)
  return "queue " .. q.base .. (q.layout and (" (" .. q.layout .. ")") or "")
end

local function shape(q, res)
  local n = function(i) return tonumber(res[i]) or 0 end
  local st = {
    queue = q.name, key = q.base, layout = res[1],
    version = (res[2] ~= "" and res[2]) or nil,
    was_paused = n(3) == 1, moved = n(4),
    wait = n(5), paused_list = n(6), prioritized = n(7), active = n(8),
    delayed = n(9), failed = n(10), completed = n(11), waiting_children = n(12),
    paused = n(13) == 1,
  }
  st.waiting = st.wait + st.paused_list + st.prioritized
  return st
end

function Queue:_run(op)
  local res = self.redis:eval(M.SCRIPT, self._keys, { op, self.layout or "",
    self.emit and "1" or "0", self.base .. ":paused", self.base .. ":resumed" })
  if res[1] == "" then
    error(qerror("ENOQUEUE", format("no Bull/BullMQ queue at %s:* (no wait, "
      .. "active, meta, events or id key): check the queue name and the prefix",
      self.base), { queue = self.name }), 0)
  end
  return shape(self, res)
end

-- q:pause() -> {queue, layout, was_paused, moved, paused = true, counts...}
function Queue:pause() return self:_run("pause") end

-- q:resume() -> the same shape, paused = false
function Queue:resume() return self:_run("resume") end

-- q:status() -> {paused, waiting, active, delayed, failed, completed,
-- prioritized, wait, paused_list, layout, version}
function Queue:status()
  local st = self:_run("status")
  st.was_paused, st.moved = nil, nil
  return st
end

-- q:detect() -> layout, version
function Queue:detect()
  local st = self:status()
  return st.layout, st.version
end

-- q:wait_idle{timeout = "60s", poll = "50ms"} -> status once no job is
-- active; raises `timeout` (ETIMEDOUT) with the last counts otherwise.
function Queue:wait_idle(opts)
  opts = opts or {}
  check_fields(opts, { timeout = true, poll = true }, "queue.wait_idle")
  local limit = opts.timeout
  if limit == nil then limit = 60 end
  limit = limit and rbe.duration(limit)
  local poll = rbe.duration(opts.poll or 0.05)
  local t0 = rbe.now()
  while true do
    local st = self:status()
    if st.active == 0 then
      st.waited = rbe.now() - t0
      return st
    end
    if limit and rbe.now() - t0 >= limit then
      local e = rbe.error("timeout", format("queue %s: %d job(s) still active after %gs",
        self.base, st.active, limit), { code = "ETIMEDOUT", retryable = true,
        queue = self.name, active = st.active })
      error(e, 0)
    end
    rbe.sleep(poll)
  end
end

-- queue.pause(q) / queue.pause(r, name[, opts]): the same as q:pause()
local function as_queue(a, b, c, fname)
  if getmetatable(a) == Queue then return a end
  if not is_redis_client(a) then
    error(fname .. ": a queue (queue.open) or an rbe.redis client and a name expected", 3)
  end
  return M.open(a, b, c)
end

function M.pause(a, b, c) return as_queue(a, b, c, "queue.pause"):pause() end
function M.resume(a, b, c) return as_queue(a, b, c, "queue.resume"):resume() end
function M.status(a, b, c) return as_queue(a, b, c, "queue.status"):status() end

-- queue.wait_idle(q, opts) or queue.wait_idle(r, name, opts): opts has
-- timeout and poll, and with a client also prefix and layout
function M.wait_idle(a, b, c)
  if getmetatable(a) == Queue then return a:wait_idle(b) end
  local open, wait = {}, {}
  for k, v in pairs(c or {}) do
    if OPEN_OPTS[k] then open[k] = v else wait[k] = v end
  end
  return as_queue(a, b, open, "queue.wait_idle"):wait_idle(wait)
end

-- queue.list(r[, {prefix = "bull"}]) -> sorted names of the queues under
-- the prefix (each has a meta, id or wait key)
function M.list(r, opts)
  if not is_redis_client(r) then
    error("queue.list: an rbe.redis client expected, got " .. type(r), 2)
  end
  opts = opts or {}
  check_fields(opts, { prefix = true }, "queue.list")
  local prefix = opts.prefix or "bull"
  local found, names = {}, {}
  local plen = #prefix + 2
  for _, suffix in ipairs { "meta", "id", "wait", "paused", "active" } do
    for key in r:scan { match = prefix .. ":*:" .. suffix, count = 1000 } do
      local name = key:sub(plen, #key - #suffix - 1)
      if name ~= "" and not found[name] then
        found[name] = true
        names[#names + 1] = name
      end
    end
  end
  table.sort(names)
  return names
end

---------------------------------------------------------------------------
-- HTTP endpoints

local function http_mod() return require "rbe.http" end

local HTTP_OPTS = { url = true, method = true, json = true, headers = true, auth = true,
  timeout = true, retries = true, expect = true, body = true, query = true }

-- one endpoint: a URL (POST) or {url, method, json, headers, auth, ...}
local function endpoint(v, defaults, fname)
  if type(v) == "string" or rbe.is_secret(v) then v = { url = v } end
  if type(v) ~= "table" or v.url == nil then
    error(fname .. ": an endpoint is a URL or a table with url", 3)
  end
  check_fields(v, HTTP_OPTS, fname, 3)
  local req = {}
  for k, x in pairs(defaults) do req[k] = x end
  for k, x in pairs(v) do req[k] = x end
  req.method = req.method or "POST"
  return req
end

local function call_endpoint(req)
  local res = http_mod().request(req)
  local ok, body = false, nil
  if res.body and res.body ~= "" then ok, body = pcall(res.json, res) end
  return { status = res.status, body = ok and body or res.body }
end

-- queue.http{pause = url|{...}, resume = url|{...}, status = url|{...},
-- headers, auth, timeout} -> a client with :pause(), :resume(), :status()
-- (each returns {status, body}; a status >= 400 raises an `http` error)
function M.http(o)
  if type(o) ~= "table" then error("queue.http: options table expected", 2) end
  check_fields(o, { pause = true, resume = true, status = true, headers = true,
    auth = true, timeout = true, retries = true }, "queue.http")
  local defaults = { headers = o.headers, auth = o.auth, timeout = o.timeout or "30s",
    retries = o.retries }
  local c = {}
  if o.pause then c._pause = endpoint(o.pause, defaults, "queue.http") end
  if o.resume then c._resume = endpoint(o.resume, defaults, "queue.http") end
  if o.status then
    c._status = endpoint(o.status, defaults, "queue.http")
    if not (type(o.status) == "table" and o.status.method) then c._status.method = "GET" end
  end
  function c.pause()
    if not c._pause then error("queue.http: no pause endpoint configured", 2) end
    return call_endpoint(c._pause)
  end
  function c.resume()
    if not c._resume then error("queue.http: no resume endpoint configured", 2) end
    return call_endpoint(c._resume)
  end
  function c.status()
    if not c._status then error("queue.http: no status endpoint configured", 2) end
    return call_endpoint(c._status)
  end
  return c
end

local Board = {}
Board.__index = Board

-- queue.bull_board(base_url[, {headers, auth, timeout}]) -> board
-- bull-board's API: GET /api/queues, PUT /api/queues/:name/pause|resume
function M.bull_board(base, o)
  if type(base) ~= "string" or not base:lower():find("^https?://") then
    error("queue.bull_board: base URL (http:// or https://) expected", 2)
  end
  o = o or {}
  check_fields(o, { headers = true, auth = true, timeout = true, retries = true },
    "queue.bull_board")
  return setmetatable({ base = base:gsub("/+$", ""), headers = o.headers, auth = o.auth,
    timeout = o.timeout or "30s", retries = o.retries }, Board)
end

function Board:_req(method, path)
  return http_mod().request { method = method, url = self.base .. path,
    headers = self.headers, auth = self.auth, timeout = self.timeout,
    retries = self.retries }
end

-- board:queues() -> {{name, paused, counts}, ...}
function Board:queues()
  local body = self:_req("GET", "/api/queues"):json()
  local out = {}
  for _, q in ipairs(type(body) == "table" and body.queues or {}) do
    out[#out + 1] = { name = q.name, paused = q.isPaused == true,
      counts = type(q.counts) == "table" and q.counts or nil }
  end
  return out
end

function Board:pause(name)
  self:_req("PUT", "/api/queues/" .. http_mod().escape(name) .. "/pause")
end

function Board:resume(name)
  self:_req("PUT", "/api/queues/" .. http_mod().escape(name) .. "/resume")
end

---------------------------------------------------------------------------
-- ready-made steps

-- A step's memory across attempts (retries, `rbe resume` after a crash):
-- a small JSON file in the run directory.  Without it a second attempt
-- would find the queues the first one paused "already paused", and the
-- undo would leave them paused.
local function memo(ctx, tag)
  if not ctx.run_dir then return {}, nil end
  local fs, json = require "rbe.fs", require "rbe.json"
  local path = ctx.run_dir .. "/." .. tag .. "-" .. tostring(ctx.step or "step")
    :gsub("[^%w%-_.]+", "-") .. ".json"
  if fs.exists(path) then
    local ok, t = pcall(json.decode, fs.read(path))
    if ok and type(t) == "table" then return t, path end
  end
  return {}, path
end

local function memo_save(path, t)
  if not path then return end
  require("rbe.fs").write(path, require("rbe.json").encode(t), { mode = "0600" })
end

local function member(list, x)
  for _, v in ipairs(list or {}) do if v == x then return true end end
  return false
end

-- step fields a builder passes through to pb.step
local STEP_FIELDS = { timeout = true, undo_timeout = true, retries = true, backoff = true,
  confirm = true, on_failure = true, description = true, when = true,
  idempotent = true }

local resolve = kit.resolve

local function base_spec(o, known, fname)
  return kit.base_spec(o, known, fname, STEP_FIELDS)
end

-- run fn(r) with the step's Redis: a client as given, or a connection
-- opened from a URL (or rbe.secret) and closed afterwards
local function with_redis(o, ctx, fn)
  local v = resolve(o.redis, ctx)
  if is_redis_client(v) then return fn(v) end
  if type(v) ~= "string" and not rbe.is_secret(v) then
    error("queue step: redis must be a URL, an rbe.secret, an rbe.redis client "
      .. "or function(ctx) returning one", 0)
  end
  local r <close> = require("rbe.redis").connect(v)
  return fn(r)
end

local function queue_names(o, ctx, r)
  local qs = resolve(o.queues, ctx)
  if qs == "*" then return M.list(r, { prefix = resolve(o.prefix, ctx) }) end
  if type(qs) == "string" then
    local out = {}
    for s in qs:gmatch("[^,%s]+") do out[#out + 1] = s end
    return out
  end
  if type(qs) ~= "table" then error("queue step: queues must be a name, a list, \"*\" "
    .. "or function(ctx)", 0) end
  return qs
end

local function open_all(o, ctx, r)
  local out = {}
  for _, name in ipairs(queue_names(o, ctx, r)) do
    out[#out + 1] = M.open(r, name, { prefix = resolve(o.prefix, ctx), layout = o.layout })
  end
  return out
end

-- A failed step is not undone by the runner (only completed ones are), so
-- a step that fails half-way puts back what it did itself, with
-- cancellation held off, and re-raises its error.
-- after(still) is called with the names that could not be put back.
local function compensate(ctx, err, names, what, fn, after)
  local still = {}
  for i = #names, 1, -1 do
    local ok, cerr = rbe.shield(rbe.try, fn, names[i])
    if ok then
      ctx.log("queue: step failed: %s %s again", what, names[i])
    else
      still[#still + 1] = names[i]
      ctx.log("queue: step failed, and %s %s failed too: %s", what, names[i],
        tostring(cerr.message or cerr))
      if rbe.is_error(err) and err.compensation_error == nil then
        err.compensation_error = cerr
      end
    end
  end
  if after then after(still) end
  error(err, 0)
end

local function describe_status(st)
  return format("%s %s (%s; %d waiting, %d active, %d delayed)", st.paused and "paused"
    or "running", st.key, st.layout, st.waiting, st.active, st.delayed)
end

local STEP_OPTS = { redis = true, queues = true, prefix = true, layout = true,
  drain = true }

-- queue.pause_step{redis, queues, prefix = "bull", layout, drain = "60s"}
-- -> a pb.step spec: pause each queue (one EVAL each), then wait until no
-- job is active (drain; false skips it).  Undo resumes only the queues
-- that were running before the step.
function M.pause_step(o)
  local spec = base_spec(o, STEP_OPTS, "queue.pause_step")
  if o.redis == nil then error("queue.pause_step: redis is required", 2) end
  if o.queues == nil then error("queue.pause_step: queues is required", 2) end

  spec.run = function(ctx)
    return with_redis(o, ctx, function(r)
      local qs = open_all(o, ctx, r)
      local result = { paused = {}, already_paused = {}, layouts = {} }
      local mem, mpath = memo(ctx, "queue-pause")
      mem.paused = mem.paused or {}
      local ok, err = rbe.try(function()
        for _, q in ipairs(qs) do
          local st = q:pause()
          result.layouts[q.name] = st.layout
          if st.was_paused and not member(mem.paused, q.name) then
            result.already_paused[#result.already_paused + 1] = q.name
            ctx.log("queue: %s was already paused (left paused, not resumed on undo)", q.base)
          else
            result.paused[#result.paused + 1] = q.name
            if not st.was_paused then
              mem.paused[#mem.paused + 1] = q.name
              memo_save(mpath, mem)
            end
            ctx.log("queue: paused %s (%s; %d waiting, %d active)", q.base, st.layout,
              st.waiting, st.active)
          end
        end
        local drain = o.drain
        if drain == nil then drain = "60s" end
        if drain then
          for _, q in ipairs(qs) do
            local st = q:wait_idle { timeout = drain }
            ctx.log("queue: %s is idle (%d waiting)", q.base, st.waiting)
          end
        end
      end)
      if not ok then
        compensate(ctx, err, result.paused, "resumed", function(name)
          M.open(r, name, { prefix = resolve(o.prefix, ctx), layout = o.layout }):resume()
        end, function(still)
          mem.paused = still
          memo_save(mpath, mem)
        end)
      end
      return result
    end)
  end

  spec.undo = function(ctx)
    local res = ctx.results[ctx.step]
    if type(res) ~= "table" or type(res.paused) ~= "table" or #res.paused == 0 then
      ctx.log("queue: nothing to resume")
      return
    end
    with_redis(o, ctx, function(r)
      for _, name in ipairs(res.paused) do
        local q = M.open(r, name, { prefix = resolve(o.prefix, ctx), layout = o.layout })
        local st = q:resume()
        ctx.log("queue: resumed %s (%d waiting)", q.base, st.waiting)
      end
    end)
  end

  spec.plan = function(ctx)
    return with_redis(o, ctx, function(r)
      local out = {}
      for _, q in ipairs(open_all(o, ctx, r)) do
        local ok, st = rbe.try(q.status, q)
        if not ok then
          out[#out + 1] = format("cannot read %s: %s", q.base, tostring(st.message or st))
        elseif st.paused then
          out[#out + 1] = "nothing: " .. describe_status(st)
            .. " is already paused; undo leaves it paused"
        else
          out[#out + 1] = "would pause " .. describe_status(st) .. "; undo resumes it"
        end
      end
      if #out == 0 then out[1] = "no queue matches" end
      return out
    end)
  end
  return spec
end

-- queue.resume_step{redis, queues, prefix, layout} -> a pb.step spec:
-- resume each queue; undo pauses again the ones that were paused before.
function M.resume_step(o)
  local spec = base_spec(o, STEP_OPTS, "queue.resume_step")
  if o.redis == nil then error("queue.resume_step: redis is required", 2) end
  if o.queues == nil then error("queue.resume_step: queues is required", 2) end

  spec.run = function(ctx)
    return with_redis(o, ctx, function(r)
      local result = { resumed = {}, already_running = {}, layouts = {} }
      local mem, mpath = memo(ctx, "queue-resume")
      mem.resumed = mem.resumed or {}
      local ok, err = rbe.try(function()
        for _, q in ipairs(open_all(o, ctx, r)) do
          local st = q:resume()
          result.layouts[q.name] = st.layout
          if st.was_paused or member(mem.resumed, q.name) then
            result.resumed[#result.resumed + 1] = q.name
            if st.was_paused then
              mem.resumed[#mem.resumed + 1] = q.name
              memo_save(mpath, mem)
            end
            ctx.log("queue: resumed %s (%d waiting)", q.base, st.waiting)
          else
            result.already_running[#result.already_running + 1] = q.name
          end
        end
      end)
      if not ok then
        compensate(ctx, err, result.resumed, "paused", function(name)
          M.open(r, name, { prefix = resolve(o.prefix, ctx), layout = o.layout }):pause()
        end, function(still)
          mem.resumed = still
          memo_save(mpath, mem)
        end)
      end
      return result
    end)
  end

  spec.undo = function(ctx)
    local res = ctx.results[ctx.step]
    if type(res) ~= "table" or type(res.resumed) ~= "table" then return end
    with_redis(o, ctx, function(r)
      for _, name in ipairs(res.resumed) do
        M.open(r, name, { prefix = resolve(o.prefix, ctx), layout = o.layout }):pause()
        ctx.log("queue: paused %s again", name)
      end
    end)
  end

  spec.plan = function(ctx)
    return with_redis(o, ctx, function(r)
      local out = {}
      for _, q in ipairs(open_all(o, ctx, r)) do
        local st = q:status()
        if st.paused then
          out[#out + 1] = "would resume " .. describe_status(st) .. "; undo pauses it again"
        else
          out[#out + 1] = "nothing: " .. describe_status(st) .. " is running"
        end
      end
      return out
    end)
  end
  return spec
end

-- queue.http_pause_step{pause = url|{...}, resume = url|{...}, status,
-- headers, auth, timeout} -> a pb.step spec calling the service's own
-- pause endpoint; undo calls its resume endpoint.
function M.http_pause_step(o)
  local spec = base_spec(o, { pause = true, resume = true, status = true, headers = true,
    auth = true, request_timeout = true }, "queue.http_pause_step")
  if o.pause == nil then error("queue.http_pause_step: pause endpoint is required", 2) end
  local function client(ctx)
    return M.http { pause = resolve(o.pause, ctx), resume = resolve(o.resume, ctx),
      status = resolve(o.status, ctx), headers = resolve(o.headers, ctx),
      auth = resolve(o.auth, ctx), timeout = o.request_timeout }
  end
  spec.run = function(ctx)
    local res = client(ctx).pause()
    ctx.log("queue: pause endpoint answered %d", res.status)
    return { status = res.status }
  end
  if o.resume ~= nil then
    spec.undo = function(ctx)
      local res = client(ctx).resume()
      ctx.log("queue: resume endpoint answered %d", res.status)
    end
  end
  spec.plan = function(ctx)
    local c = client(ctx)
    local out = { format("would %s %s", c._pause.method, http_mod().mask_url(
      rbe.reveal(c._pause.url))) }
    if c._resume then
      out[2] = format("undo: %s %s", c._resume.method, http_mod().mask_url(
        rbe.reveal(c._resume.url)))
    else
      out[2] = "no resume endpoint: no undo"
    end
    return out
  end
  return spec
end

-- queue.bull_board_step{url, queues = {...} | "*", headers, auth} -> a
-- pb.step spec pausing queues through bull-board; undo resumes the ones
-- that were running before.
function M.bull_board_step(o)
  local spec = base_spec(o, { url = true, queues = true, headers = true, auth = true,
    request_timeout = true }, "queue.bull_board_step")
  if o.url == nil then error("queue.bull_board_step: url is required", 2) end
  local function board(ctx)
    return M.bull_board(resolve(o.url, ctx), { headers = resolve(o.headers, ctx),
      auth = resolve(o.auth, ctx), timeout = o.request_timeout })
  end
  local function targets(ctx, b)
    local list = b:queues()
    local by = {}
    for _, q in ipairs(list) do by[q.name] = q end
    local want = resolve(o.queues, ctx) or "*"
    if want == "*" then return list end
    if type(want) == "string" then want = { want } end
    local out = {}
    for _, name in ipairs(want) do
      local q = by[name]
      if not q then
        error(qerror("ENOQUEUE", format("bull-board at %s has no queue '%s'",
          b.base, name), { queue = name }), 0)
      end
      out[#out + 1] = q
    end
    return out
  end
  spec.run = function(ctx)
    local b = board(ctx)
    local result = { paused = {}, already_paused = {} }
    local list = targets(ctx, b)
    local mem, mpath = memo(ctx, "queue-board")
    mem.paused = mem.paused or {}
    local ok, err = rbe.try(function()
      for _, q in ipairs(list) do
        if q.paused and member(mem.paused, q.name) then
          result.paused[#result.paused + 1] = q.name
        elseif q.paused then
          result.already_paused[#result.already_paused + 1] = q.name
        else
          b:pause(q.name)
          result.paused[#result.paused + 1] = q.name
          mem.paused[#mem.paused + 1] = q.name
          memo_save(mpath, mem)
          ctx.log("queue: paused %s through bull-board", q.name)
        end
      end
    end)
    if not ok then
      compensate(ctx, err, result.paused, "resumed", function(name) b:resume(name) end,
        function(still)
          mem.paused = still
          memo_save(mpath, mem)
        end)
    end
    return result
  end
  spec.undo = function(ctx)
    local res = ctx.results[ctx.step]
    if type(res) ~= "table" or type(res.paused) ~= "table" then return end
    local b = board(ctx)
    for _, name in ipairs(res.paused) do
      b:resume(name)
      ctx.log("queue: resumed %s through bull-board", name)
    end
  end
  spec.plan = function(ctx)
    local b = board(ctx)
    local out = {}
    for _, q in ipairs(targets(ctx, b)) do
      out[#out + 1] = q.paused and format("nothing: %s is already paused", q.name)
        or format("would pause %s through bull-board; undo resumes it", q.name)
    end
    return out
  end
  return spec
end

M.Queue = Queue
return M
