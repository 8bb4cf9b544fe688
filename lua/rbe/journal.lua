-- rbe.journal: the append-only record of a run, one JSON object per line
-- in <state-dir>/runs/<run-id>/journal.jsonl.  Directories are 0700 and
-- files 0600 whatever the umask; step boundaries are fsync'd.  Reading
-- tolerates a torn last line (a crash in the middle of a write).
local rbe = require "rbe"
local fs = require "rbe.fs"
local cjson = require "cjson"

local M = {}

local function chmod_dir(path)
  -- fs.mkdir applies a mode only to a directory it creates; make sure an
  -- existing one is private too
  local st = fs.stat(path)
  if st and st.mode & 0x3f ~= 0 then fs.chmod(path, "0700") end
end

-- The state directory: --state-dir, $RBE_STATE_DIR, or ./.rbe
function M.state_dir(opt)
  return opt or os.getenv("RBE_STATE_DIR") or ".rbe"
end

function M.ensure_dir(path)
  fs.mkdir(path, { mode = "0700" })
  chmod_dir(path)
end

-- A new run id: time plus randomness, sortable.
function M.new_id()
  local t = rbe.time()
  local rnd = rbe.sha256(tostring(t) .. tostring({}) .. rbe.whoami().pid):sub(1, 6)
  return os.date("!%Y%m%d-%H%M%S", math.floor(t)) .. "-" .. rnd
end

-- Make values JSON-safe: secrets become "***", functions and userdata
-- their type name, cycles cut, depth bounded.
local function sanitize(v, mask, depth, seen)
  local t = type(v)
  if rbe.is_secret(v) then return "***" end
  if v == rbe.null then return cjson.null end
  if t == "string" then return mask and mask(v) or v end
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return tostring(v) end
    return v
  end
  if t == "boolean" or t == "nil" then return v end
  if t == "table" then
    if rbe.is_error(v) then
      return { kind = v.kind, message = sanitize(v.message, mask, depth, seen),
               code = sanitize(v.code, mask, depth, seen) }
    end
    if seen[v] or depth > 8 then return "<cycle or too deep>" end
    seen[v] = true
    local out, n = {}, 0
    for k, x in pairs(v) do
      n = n + 1
      if n > 200 then break end
      local key = type(k) == "string" and k or (math.type(k) == "integer" and k or tostring(k))
      out[key] = sanitize(x, mask, depth + 1, seen)
    end
    seen[v] = nil
    return out
  end
  return "<" .. t .. ">"
end

function M.sanitize(v, mask)
  return sanitize(v, mask, 0, {})
end

local Journal = {}
Journal.__index = Journal

-- journal.open(run_dir, {mask = fn, fsync = true}) -> journal
function M.open(run_dir, opts)
  opts = opts or {}
  M.ensure_dir(run_dir)
  local j = setmetatable({ dir = run_dir, path = run_dir .. "/journal.jsonl",
                           mask = opts.mask, fsync = opts.fsync ~= false }, Journal)
  return j
end

-- j:write(event[, sync]) appends one line; sync forces an fsync (step
-- boundaries).  Events get a wall-clock timestamp `ts`.
function Journal:write(ev, sync)
  ev.ts = ev.ts or rbe.time()
  local ok, line = pcall(cjson.encode, M.sanitize(ev, self.mask))
  if not ok then line = cjson.encode({ ev = ev.ev, ts = ev.ts, encode_error = tostring(line) }) end
  fs.append(self.path, line .. "\n", { fsync = sync and self.fsync, mode = "0600" })
end

-- journal.read(path) -> events (array); a torn or garbled last line is
-- skipped, a garbled line elsewhere is an error
function M.read(path)
  local text = fs.read(path)
  local events, lines = {}, {}
  for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
  local torn = text ~= "" and text:sub(-1) ~= "\n"
  for i, line in ipairs(lines) do
    local ok, ev = pcall(cjson.decode, line)
    if ok and type(ev) == "table" then
      events[#events + 1] = ev
    elseif i == #lines then
      torn = true
    else
      error(rbe.error("journal", ("%s:%d: unreadable journal line"):format(path, i)), 0)
    end
  end
  return events, torn
end

-- Check a journal may be trusted: not group/world-writable, owned by us.
function M.check_private(path)
  local st = fs.stat(path)
  if not st then return nil, path .. " does not exist" end
  local me = rbe.whoami().uid
  if st.uid ~= me then
    return nil, ("%s is owned by uid %d, not by you (uid %d)"):format(path, st.uid, me)
  end
  if st.mode & 0x12 ~= 0 then
    return nil, ("%s is group- or world-writable (mode %o)"):format(path, st.mode)
  end
  return true
end

return M
