-- rbe.cli: the command line.  main(argv) runs as the main task and returns
-- the process exit code: 0 done, 1 failed, 2 usage or playbook error.
local rbe = require "rbe"
_G.rbe = rbe

local M = {}

local USAGE = [[
usage: rbe <command> [args]
       rbe FILE [args...]        run a Lua script as the main task

commands:
  run FILE [options]   run a playbook (undo on failure, journal, report)
  plan FILE            show what a playbook would do, changing nothing
  resume RUN_ID        continue a crashed or interrupted run
  history              list runs
  show RUN_ID          a run's report and journal
  watch FILE           run a playbook when its trigger fires
  repl                 the live incident console
  version              print rbe's version and those of its libraries
  help [COMMAND]       show this help, or a command's (also: exit-codes)

Exit codes: 0 done, 1 failed (undo ran), 2 usage or playbook error,
3 undo failed, 75 lock held, 130 interrupted.
Environment: RBE_PATH (rbe's Lua library root), RBE_USE_LUA_PATH=1 (honour
LUA_PATH/LUA_CPATH, ignored by default), RBE_LOG (debug|info|warn|error).
]]

local HELP = {
  repl = "usage: rbe repl [--load FILE] [--state-dir DIR]\nThe live incident console (see docs/repl.md).\n",
  version = "usage: rbe version\nPrints the versions of rbe, Lua and every linked library.\n",
  help = "usage: rbe help [COMMAND]\n",
}

local function usage_error(msg)
  io.stderr:write("rbe: ", msg, "\n", "Run 'rbe --help' for usage.\n")
  return 2
end

local function set_arg(argv, script_index)
  local a = {}
  for i = 0, #argv do a[i - script_index] = argv[i] end
  _G.arg = a
  return table.unpack(a, 1, #argv - script_index)
end

local function run_script(argv, script_index, load_error_code)
  local path = argv[script_index]
  if not path then return usage_error("missing FILE") end
  local chunk, err = loadfile(path ~= "-" and path or nil)
  if not chunk then
    io.stderr:write("rbe: ", err, "\n")
    return load_error_code
  end
  chunk(set_arg(argv, script_index))
  return 0
end

local function version()
  local v = rbe.versions()
  for _, m in ipairs { "pg", "http", "redis", "repl" } do
    local ok, core = pcall(require, "rbe." .. m .. ".core")
    if ok and type(core) == "table" and type(core._versions) == "table" then
      for k, ver in pairs(core._versions) do v[k] = ver end
    end
  end
  local names = {}
  for k in pairs(v) do if k ~= "rbe" then names[#names + 1] = k end end
  table.sort(names)
  io.write("rbe ", v.rbe, "\n")
  for _, k in ipairs(names) do io.write(("  %-10s %s\n"):format(k, v[k])) end
  return 0
end

function M.main(argv)
  local cmd = argv[1]
  if cmd == nil then io.stderr:write(USAGE) return 2 end
  if cmd == "-h" or cmd == "--help" then io.write(USAGE) return 0 end
  if cmd == "help" then
    local topic = argv[2]
    if not topic then io.write(USAGE) return 0 end
    local text = HELP[topic] or require("rbe.pbcli").HELP[topic]
    if not text and topic == "watch" then text = require("rbe.watch").HELP end
    if not text then return usage_error("no such command: " .. topic) end
    io.write(text)
    return 0
  end
  if cmd == "version" or cmd == "--version" or cmd == "-v" then return version() end
  if cmd == "watch" then
    local args = {}
    for i = 2, #argv do args[#args + 1] = argv[i] end
    return require("rbe.watch").main(args)
  end
  if cmd == "repl" then
    local args = {}
    for i = 2, #argv do args[#args + 1] = argv[i] end
    return require("rbe.repl").main(args)
  end
  local pbcli_cmds = { run = true, plan = true, resume = true, history = true, show = true }
  if pbcli_cmds[cmd] then
    local pbcli = require "rbe.pbcli"
    if argv[2] == "-h" or argv[2] == "--help" then io.write(pbcli.HELP[cmd]) return 0 end
    local args = {}
    for i = 2, #argv do args[#args + 1] = argv[i] end
    return pbcli[cmd](args)
  end
  if cmd:sub(1, 1) == "-" and cmd ~= "-" then
    return usage_error("unknown option " .. cmd)
  end
  return run_script(argv, 1, 1)
end

return M
