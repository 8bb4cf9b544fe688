-- rbe.pg: PostgreSQL.  The C core (rbe.pg.core, core/pg.c) connects, sends
-- and reads on libpq's asynchronous API, turns results into Lua values,
-- cancels and times out requests; its connection methods (query, exec,
-- copy_out, copy_in, close, ...) are the methods of the handles directly.
-- This file adds the parts written in Lua: transactions and savepoints,
-- pipelines, LISTEN iterators and pools.  See docs/pg.md.
--
--   pg.connect(url_or_params, opts) -> db       [yields]
--   pg.pool(url_or_params, opts)    -> pool
--   db:query(sql, ...) -> rows   db:exec(script) -> results
--   db:tx(fn, opts) -> fn's results   db:pipeline(fn) -> {rows, ...}
--   db:copy_out(sql, path) / db:copy_in(sql, path) -> {rows, bytes, path}
--   db:listen(channel, opts) -> iterator of {channel, payload, pid}
local core = require "rbe.pg.core"
local aux = require "rbe.aux"
local task = require "rbe.core"

local type, error, pcall, pairs, select, setmetatable, tostring, ipairs, getmetatable =
  type, error, pcall, pairs, select, setmetatable, tostring, ipairs, getmetatable
local pack, unpack, remove = table.pack, table.unpack, table.remove
local shield, timeout = task.shield, task.timeout

local M = {}

M.null = aux.null
M.bytea = core.bytea
M._core = core

local conn = core.conn_methods
local txm = core.tx_methods

-- pg.connect(url_or_params, opts) -> db  [yields]
function M.connect(target, opts)
  return core.connect(target, opts)
end

-- pg.quote_ident(name) -> "name" quoted as an SQL identifier
function M.quote_ident(name)
  if type(name) ~= "string" then
    error("pg.quote_ident: string expected, got " .. type(name), 2)
  end
  return '"' .. name:gsub('"', '""') .. '"'
end
local quote_ident = M.quote_ident

---------------------------------------------------------------------------
-- pipelines

local Pipe = {}
Pipe.__index = Pipe

-- p:query(sql, ...) -> index of the statement's rows in the results
function Pipe:query(sql, ...)
  if type(sql) ~= "string" then
    error("pipeline:query: SQL string expected, got " .. type(sql), 2)
  end
  local q = self._q
  local n = #q + 1
  if select("#", ...) == 0 then q[n] = sql else q[n] = pack(sql, ...) end
  return n
end

-- db:pipeline(fn | list, opts) -> {rows, ...}  [yields]
-- fn(p) queues statements with p:query(sql, ...); they are sent at once
-- in pipeline mode when fn returns and answered in one round trip.
local function pipeline(self, fn, opts)
  local p = setmetatable({ _q = {} }, Pipe)
  if type(fn) == "table" then
    for i, s in ipairs(fn) do
      if type(s) == "string" then p:query(s)
      elseif type(s) == "table" then p:query(unpack(s, 1, s.n or #s))
      else error(("db:pipeline: item %d must be SQL or {sql, ...}"):format(i), 2) end
    end
  elseif type(fn) == "function" or (getmetatable(fn) or {}).__call then
    fn(p)
  else
    error("db:pipeline: function or list of statements expected, got " .. type(fn), 2)
  end
  return self:_pipeline(p._q, opts)
end
conn.pipeline = pipeline
txm.pipeline = pipeline

---------------------------------------------------------------------------
-- notifications

local function listen(self, channel, opts)
  if type(channel) ~= "string" or channel == "" then
    error("db:listen: channel name expected", 2)
  end
  local t = opts and opts.timeout
  self:exec("LISTEN " .. quote_ident(channel))
  return function()
    return self:_next_notification(channel, t)
  end
end

-- db:listen(channel, {timeout = d}) -> iterator  [the iterator yields]
-- Each call returns the next {channel, payload, pid} sent to channel;
-- with a timeout, a `timeout` error when none came in time.
conn.listen = listen

-- db:unlisten([channel]) -> nothing (all channels when none is given)
function conn:unlisten(channel)
  self:exec(channel and "UNLISTEN " .. quote_ident(channel) or "UNLISTEN *")
end

-- db:notify(channel, payload) -> nothing  [yields]
local function notify(self, channel, payload)
  self:query("select pg_notify($1, $2)", channel, payload or "")
end
conn.notify = notify
txm.notify = notify

---------------------------------------------------------------------------
-- transactions

local ISOLATION = {
  ["serializable"] = "SERIALIZABLE",
  ["repeatable read"] = "REPEATABLE READ",
  ["read committed"] = "READ COMMITTED",
  ["read uncommitted"] = "READ UNCOMMITTED",
}
local TX_OPTS = { isolation = true, read_only = true, deferrable = true,
                  retries = true }

local function begin_sql(opts, level)
  if opts == nil then return "BEGIN" end
  if type(opts) ~= "table" then
    error("db:tx: options table expected, got " .. type(opts), level)
  end
  for k in pairs(opts) do
    if not TX_OPTS[k] then error("db:tx: unknown option '" .. tostring(k) .. "'", level) end
  end
  local sql = "BEGIN"
  if opts.isolation ~= nil then
    local iso = ISOLATION[tostring(opts.isolation):lower():gsub("_", " ")]
    if not iso then
      error("db:tx: isolation must be \"serializable\", \"repeatable read\", "
        .. "\"read committed\" or \"read uncommitted\", got '"
        .. tostring(opts.isolation) .. "'", level)
    end
    sql = sql .. " ISOLATION LEVEL " .. iso
  end
  if opts.read_only ~= nil then
    sql = sql .. (opts.read_only and " READ ONLY" or " READ WRITE")
  end
  if opts.deferrable ~= nil then
    sql = sql .. (opts.deferrable and " DEFERRABLE" or " NOT DEFERRABLE")
  end
  return sql
end

-- Roll back even when the task is being cancelled or timed out.
local function rollback(t, sql)
  return shield(pcall, t.exec, t, { sql, timeout = 30 })
end

local function with_rollback_error(err, ok, rerr)
  if not ok and type(err) == "table" then err.rollback_error = rerr end
  return err
end

local function begin_and_run(t, fn, sql)
  t:exec(sql)
  return fn(t)
end

local function run_tx(t, fn, sql)
  -- a BEGIN that timed out may still have run: roll back in every case
  local res = pack(pcall(begin_and_run, t, fn, sql))
  if not res[1] then
    error(with_rollback_error(res[2], rollback(t, "ROLLBACK")), 0)
  end
  local r = t:exec("COMMIT")
  if r[1] and r[1].command == "ROLLBACK" then
    local e = aux.error("pg", "db:tx: COMMIT rolled the transaction back: a "
      .. "statement inside it failed and its error was caught")
    e.code = "25P02"
    error(e, 0)
  end
  return unpack(res, 2, res.n)
end

local function retryable_tx_error(err)
  return type(err) == "table" and (err.code == "40001" or err.code == "40P01")
end

-- db:tx(fn, {isolation, read_only, deferrable, retries}) -> fn's results
-- [yields]  BEGIN; fn(tx); COMMIT.  Any error: ROLLBACK and re-raise.
-- Other tasks' requests on this connection wait until it is over.
function conn:tx(fn, opts)
  if type(fn) ~= "function" and not (getmetatable(fn) or {}).__call then
    error("db:tx: function expected, got " .. type(fn), 2)
  end
  local sql = begin_sql(opts, 3)
  local retries = opts and opts.retries or 0
  if math.type(retries) ~= "integer" or retries < 0 then
    error("db:tx: retries must be a non-negative integer", 2)
  end
  local attempt = 0
  while true do
    attempt = attempt + 1
    local t = self:_lock()
    local res = pack(pcall(run_tx, t, fn, sql))
    t:_unlock()
    if res[1] then return unpack(res, 2, res.n) end
    local err = res[2]
    if attempt > retries or not retryable_tx_error(err) then error(err, 0) end
  end
end

local depth = setmetatable({}, { __mode = "k" })

-- tx:tx(fn) -> fn's results  [yields]  a nested transaction: a SAVEPOINT,
-- released when fn returns, rolled back to when it raises (re-raised).
function txm:tx(fn)
  if type(fn) ~= "function" and not (getmetatable(fn) or {}).__call then
    error("tx:tx: function expected, got " .. type(fn), 2)
  end
  local d = (depth[self] or 0) + 1
  local name = "rbe_sp_" .. d
  self:exec("SAVEPOINT " .. name)
  depth[self] = d
  local res = pack(pcall(fn, self))
  depth[self] = d - 1
  if res[1] then
    self:exec("RELEASE SAVEPOINT " .. name)
    return unpack(res, 2, res.n)
  end
  error(with_rollback_error(res[2], rollback(self, "ROLLBACK TO SAVEPOINT "
    .. name .. "; RELEASE SAVEPOINT " .. name)), 0)
end

---------------------------------------------------------------------------
-- pools

local Pool = {}
Pool.__index = Pool
Pool.__name = "rbe.pg.pool"

local POOL_OPTS = { size = true, acquire_timeout = true }

-- pg.pool(url_or_params, {size = 10, acquire_timeout = d, ...connect
-- options}) -> pool.  Connections are opened when needed, at most size.
function M.pool(target, opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("pg.pool: options table expected, got " .. type(opts), 2)
  end
  opts = opts or {}
  local size = opts.size or 10
  if math.type(size) ~= "integer" or size < 1 then
    error("pg.pool: size must be a positive integer", 2)
  end
  local copts = {}
  for k, v in pairs(opts) do
    if not POOL_OPTS[k] then copts[k] = v end
  end
  if opts.acquire_timeout ~= nil then aux.duration(opts.acquire_timeout) end
  return setmetatable({
    _target = target, _copts = copts, _size = size,
    _acquire_timeout = opts.acquire_timeout,
    _sem = core.semaphore(size), _idle = {}, _in_use = 0, _closed = false,
    _opened = 0, _discarded = 0,
  }, Pool)
end

-- pool:acquire() -> db  [yields]  an idle connection, or a new one
function Pool:acquire()
  if self._closed then error("pool:acquire: the pool is closed", 2) end
  if self._acquire_timeout then
    timeout(self._acquire_timeout, self._sem.acquire, self._sem)
  else
    self._sem:acquire()
  end
  local ok, c = pcall(function()
    if self._closed then error("pool:acquire: the pool is closed", 0) end
    local idle = self._idle
    while #idle > 0 do
      local c = remove(idle)
      if c:status() == "ready" then return c end
      c:close()
      self._discarded = self._discarded + 1
    end
    local c = M.connect(self._target, self._copts)
    self._opened = self._opened + 1
    return c
  end)
  if not ok then
    self._sem:release()
    error(c, 0)
  end
  self._in_use = self._in_use + 1
  return c
end

-- pool:release(db[, discard]) -> nothing: back to the pool, or closed if
-- it is broken, still inside a transaction, or discard is true
function Pool:release(c, discard)
  self._in_use = self._in_use - 1
  if discard or self._closed or c:status() ~= "ready" or c:_tx_status() ~= "idle" then
    c:close()
    if not self._closed then self._discarded = self._discarded + 1 end
  else
    local idle = self._idle
    idle[#idle + 1] = c
  end
  self._sem:release()
end

local function finish(self, c, ok, ...)
  self:release(c, not ok and c:status() ~= "ready")
  if not ok then error((...), 0) end
  return ...
end

-- pool:with(fn) -> fn's results  [yields]  fn(db) on a pooled connection
function Pool:with(fn, ...)
  local c = self:acquire()
  return finish(self, c, pcall(fn, c, ...))
end

local function via(method)
  return function(self, ...)
    local c = self:acquire()
    return finish(self, c, pcall(c[method], c, ...))
  end
end

Pool.query = via("query")
Pool.exec = via("exec")
Pool.tx = via("tx")
Pool.pipeline = via("pipeline")
Pool.copy_out = via("copy_out")
Pool.copy_in = via("copy_in")

-- pool:stats() -> {size, open, idle, in_use, waiting, opened, discarded}
function Pool:stats()
  local _, waiting = self._sem:state()
  return {
    size = self._size, idle = #self._idle, in_use = self._in_use,
    open = #self._idle + self._in_use, waiting = waiting,
    opened = self._opened, discarded = self._discarded,
  }
end

-- pool:close() -> nothing: idle connections now, busy ones when released
function Pool:close()
  if self._closed then return end
  self._closed = true
  for _, c in ipairs(self._idle) do c:close() end
  self._idle = {}
end

Pool.__close = Pool.close
Pool.__gc = Pool.close

function Pool:__tostring()
  local s = self:stats()
  return ("pg.pool (%d/%d open, %d idle%s)"):format(s.open, s.size, s.idle,
    self._closed and ", closed" or "")
end

return M
