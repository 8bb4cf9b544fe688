-- rbe.proc: child processes.  The C core (rbe.proc.core) starts, drains,
-- times out, kills and reaps children; this module is the public surface
-- and adds small conveniences on top (output, quote).
--
--   proc.run(argv, opts)       -> result   [yields]  no shell, ever
--   proc.sh(cmdline, opts)     -> result   [yields]  /bin/sh -c cmdline
--   proc.output(argv, opts)    -> stdout without its final newline [yields]
--   proc.spawn(argv, opts)     -> child    long-running; see docs/proc.md
--   proc.spawn_sh(cmdline, opts) -> child
--   proc.quote(s)              -> s quoted for /bin/sh
--
-- result = {code, signal, stdout, stderr, pid, elapsed, truncated}
local core = require "rbe.proc.core"

local type, error, tostring = type, error, tostring

local M = {}

M.run = core.run
M.sh = core.sh
M.spawn = core.spawn
M.spawn_sh = core.spawn_sh
M._stats = core._stats

-- proc.output(argv, opts) -> the command's stdout, trailing newline removed
function M.output(argv, opts)
  local r = core.run(argv, opts)
  return (r.stdout:gsub("\r?\n$", ""))
end

-- proc.quote(s) -> s as one /bin/sh word: proc.sh("grep -- " .. proc.quote(p))
function M.quote(s)
  if type(s) == "number" then s = tostring(s) end
  if type(s) ~= "string" then
    error("proc.quote: string expected, got " .. type(s), 2)
  end
  if s ~= "" and not s:find("[^%w_@%%+=:,./-]") then return s end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

return M
