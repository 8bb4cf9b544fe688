-- tests/run.lua: busted hosted by rbe itself.  `rbe tests/run.lua [busted
-- args] SPEC...` runs the specs inside the main task, so an `it` block can
-- call rbe.sleep, spawn tasks and run processes on the real loop.  If
-- RBE_TEST_ENV_FILE names a file of KEY=VALUE lines (written by
-- tests/fixtures/servers.sh), those are exported first.
local rbe = require "rbe"

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
package.path = here .. "/?.lua;" .. here .. "/?/init.lua;" .. package.path

local env_file = os.getenv("RBE_TEST_ENV_FILE")
if env_file and env_file ~= "" then
  local f = assert(io.open(env_file), "cannot read RBE_TEST_ENV_FILE " .. env_file)
  for line in f:lines() do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then rbe.setenv(k, v) end
  end
  f:close()
end

-- the helper checks after each spec that nothing leaked
local args = { "--helper=" .. here .. "/helper.lua" }
for i = 1, #arg do args[#args + 1] = arg[i] end
_G.arg = args

require "busted.runner" ({ standalone = false })
