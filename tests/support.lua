-- tests/support.lua: small helpers shared by the specs
-- (`local support = require "support"`; tests/ is on package.path).
local rbe = require "rbe"
local fs = require "rbe.fs"

local M = {}

-- raises(f, ...) -> the error f raised; fails the spec if it did not raise
function M.raises(f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error")
  return err
end

-- read_kv(path) -> {KEY = value} from KEY=VALUE lines (fixtures' env files)
function M.read_kv(path)
  local t = {}
  for line in fs.lines(path) do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then t[k] = v end
  end
  return t
end

-- the rbe binary under test (absolute path)
function M.rbe_bin()
  return os.getenv("RBE_BIN") or (rbe.whoami().cwd .. "/build/bin/rbe")
end

return M
