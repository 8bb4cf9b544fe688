-- rbe.pbload: read and run a playbook file, as text only.  Kept apart from
-- rbe.playbook so that `rbe run script.lua` (a file that does not return a
-- playbook) never loads the playbook engine.
local rbe = require "rbe"

local M = {}

-- exit codes of the playbook commands (`rbe help exit-codes`); here so the
-- CLI has them without loading the playbook engine
M.EXIT = { ok = 0, failed = 1, usage = 2, undo_failed = 3, locked = 75,
           interrupted = 130 }

local function perror(msg)
  local e = rbe.error("playbook", msg)
  error(e, 0)
end

-- load_chunk(path) -> value the file returned, its text.  Syntax and
-- runtime errors of the file are playbook errors (exit 2).
function M.load_chunk(path)
  local f, oerr = io.open(path, "rb")
  if not f then perror("cannot read playbook " .. tostring(oerr)) end
  local text = f:read("a")
  f:close()
  if text:sub(1, 4) == "\27Lua" then
    perror(path .. ": precompiled chunks are refused: playbooks load as text only")
  end
  local env = setmetatable({}, { __index = _G })
  local chunk, err = load(text, "@" .. path, "t", env)
  if not chunk then perror(err) end
  local ok, root = pcall(chunk)
  if not ok then
    -- os.exit inside the file unwinds the task: let it through
    if rbe.is_error(root) and (root.kind == "playbook" or root.kind == "exit") then
      error(root, 0)
    end
    perror(rbe.is_error(root) and root.message or tostring(root))
  end
  return root, text
end

return M
