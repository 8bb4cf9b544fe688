-- rbe.fs: small local files.  read, write (atomic), append, exists, stat,
-- mkdir, remove and tmpdir come straight from the C core (rbe.fs.core,
-- core/fs.c: plain synchronous syscalls, fine for the configs, journals
-- and logs a rollback touches); this file adds list's sorting, the lines
-- iterator and tail, which follows a growing log across truncation and
-- rotation.  tail waits by polling with rbe.sleep, so it only waits inside
-- a task, never blocks the loop, and rbe.timeout or a cancel stops it like
-- any other wait.  Failures raise error objects of kind "fs" whose code is
-- the errno name; misuse raises a plain error naming the function.
local core = require "rbe.fs.core"
local aux = require "rbe.aux"
local timer = require "rbe.timer"

local type, error, pcall, pairs, setmetatable, tostring =
  type, error, pcall, pairs, setmetatable, tostring
local sort = table.sort
local sleep, now = timer.sleep, timer.now
local max, min = math.max, math.min

local BLOCK = 65536

local M = {}

M.read = core.read
M.write = core.write
M.append = core.append
M.exists = core.exists
M.stat = core.stat
M.mkdir = core.mkdir
M.remove = core.remove
M.tmpdir = core.tmpdir
M.chmod = core.chmod

-- fs.list(dir) -> sorted array of the names in dir (no "." and "..")
function M.list(dir)
  local names = core.list(dir)
  sort(names)
  return names
end

local function check_path(path, fname)
  if type(path) ~= "string" then
    error(fname .. ": path must be a string, got " .. type(path), 3)
  end
end

---------------------------------------------------------------------------
-- line splitting shared by lines and tail: a line ends at "\n" (a "\r"
-- before it is dropped too); what follows the last "\n" waits for more.

local function strip_cr(s)
  if s:byte(-1) == 13 then return s:sub(1, -2) end
  return s
end

local Splitter = {}
Splitter.__index = Splitter

local function splitter()
  return setmetatable({ buf = "", pos = 1 }, Splitter)
end

function Splitter:push(chunk)
  if self.pos > #self.buf then self.buf = chunk
  else self.buf = self.buf:sub(self.pos) .. chunk end
  self.pos = 1
end

-- the next complete line, or nil
function Splitter:next()
  local nl = self.buf:find("\n", self.pos, true)
  if not nl then return nil end
  local line = self.buf:sub(self.pos, nl - 1)
  self.pos = nl + 1
  return strip_cr(line)
end

-- the unfinished last line (nil if none), which is then dropped
function Splitter:flush()
  local rest = self.buf:sub(self.pos)
  self.buf, self.pos = "", 1
  if rest == "" then return nil end
  return strip_cr(rest)
end

---------------------------------------------------------------------------

-- fs.lines(path) -> iterator over the lines of the file, without their
-- "\n" (or "\r\n"); a last line without a newline counts.  In a generic
-- for, breaking out of the loop (or an error) closes the file at once.
function M.lines(path)
  check_path(path, "fs.lines")
  local f = core.open(path, "fs.lines")
  local sp, eof = splitter(), false
  local function iter()
    while true do
      local line = sp:next()
      if line then return line end
      if eof then return nil end
      local chunk = f:read(BLOCK)
      if chunk == "" then
        eof = true
        f:close()
        return sp:flush()
      end
      sp:push(chunk)
    end
  end
  return iter, nil, nil, f
end

local TAIL_OPTS = { follow = true, from = true, poll = true, duration = true }

local function opt_duration(v, name)
  local ok, secs = pcall(aux.duration, v)
  if not ok then
    error("fs.tail: option '" .. name .. "': " .. tostring(secs):gsub("^rbe%.duration: ", ""), 3)
  end
  return secs
end

local function is_enoent(e)
  return aux.is_error(e) and e.kind == "fs" and e.code == "ENOENT"
end

-- fs.tail(path[, {follow, from, poll, duration}]) -> iterator over lines
--
-- Without follow: the file's lines from `from` ("start", the default, or
-- "end") to its current end, then the iteration ends.  With follow = true
-- it keeps going: at the end of the file it sleeps `poll` (default
-- "250ms") and reads what was appended meanwhile; `from` defaults to
-- "end" (only new lines).  A line is returned once its "\n" is there.
-- It notices a rotation (path now names another file: the rest of the
-- old file is read first, then the new one from its start) and a
-- truncation (size below what was read: start again at 0); an unfinished
-- line is returned as it was when its file ended that way.  While the
-- path is missing (mid-rotation) it keeps waiting.  It ends after
-- `duration` if given, else only when stopped: break, rbe.timeout,
-- task:cancel().  In a generic for, the file is closed when the loop ends
-- in any way.
function M.tail(path, opts)
  check_path(path, "fs.tail")
  if opts ~= nil and type(opts) ~= "table" then
    error("fs.tail: options must be a table, got " .. type(opts), 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not TAIL_OPTS[k] then error("fs.tail: unknown option '" .. tostring(k) .. "'", 2) end
  end
  local follow = opts.follow and true or false
  local from = opts.from or (follow and "end" or "start")
  if from ~= "start" and from ~= "end" then
    error("fs.tail: option 'from' must be \"start\" or \"end\", got " .. tostring(from), 2)
  end
  local poll = 0.25
  if opts.poll ~= nil then
    poll = opt_duration(opts.poll, "poll")
    if poll <= 0 then error("fs.tail: option 'poll' must be positive", 2) end
  end
  local deadline
  if opts.duration ~= nil then
    if not follow then error("fs.tail: option 'duration' needs follow = true", 2) end
    deadline = now() + opt_duration(opts.duration, "duration")
  end

  local f = core.open(path, "fs.tail")
  local off = from == "end" and f:stat().size or 0
  local sp, done = splitter(), false

  local function finish()
    done = true
    f:close()
  end

  local function iter()
    while true do
      local line = sp:next()
      if line then return line end
      if done then return nil end
      if deadline and now() >= deadline then
        finish()
        return nil
      end
      local chunk = f:read(BLOCK, off)
      if chunk ~= "" then
        off = off + #chunk
        sp:push(chunk)
      elseif not follow then
        finish()
        return sp:flush()
      else
        -- at the end of what is there: truncated, replaced, or wait
        local fst = f:stat()
        local pst = core.stat(path)
        if fst.size < off then
          off = 0
          local rest = sp:flush()
          if rest then return rest end
        elseif pst and (pst.ino ~= fst.ino or pst.dev ~= fst.dev) then
          -- replaced: first take what reached the old file since the read
          local more = f:read(BLOCK, off)
          if more ~= "" then
            off = off + #more
            sp:push(more)
          else
            local ok, nf = pcall(core.open, path, "fs.tail")
            if ok then
              f:close()
              f, off = nf, 0
              local rest = sp:flush()
              if rest then return rest end
            elseif is_enoent(nf) then
              sleep(poll)   -- gone again before we could open it
            else
              error(nf, 0)
            end
          end
        else
          -- always a real wait, even of 0s: a follow loop never spins
          -- without giving the loop (and rbe.timeout) a turn
          local wait = poll
          if deadline then wait = max(0, min(wait, deadline - now())) end
          sleep(wait)
        end
      end
    end
  end

  -- the closing value closes whichever file is current when the loop ends
  local closer = setmetatable({}, { __close = function() f:close() end })
  return iter, nil, nil, closer
end

return M
