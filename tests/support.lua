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

-- recorder() -> the recording HTTP endpoint (tests/fixtures/recorder.js)
-- started with no proxy in the environment: rec.base, rec:respond(rule),
-- rec:reset() (forget requests and rules), rec:close()
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local Recorder = {}
Recorder.__index = Recorder

function M.recorder()
  local proc, json = require "rbe.proc", require "rbe.json"
  for _, v in ipairs { "http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY" } do
    rbe.setenv(v, nil)
  end
  local srv = proc.spawn({ "node", HERE .. "/fixtures/recorder.js" }, { stderr = "inherit" })
  local line = rbe.timeout("20s", srv:lines())
  local port = json.decode(assert(line, "recorder printed no port")).http
  return setmetatable({ srv = srv, base = "http://127.0.0.1:" .. port }, Recorder)
end

function Recorder:respond(rule)
  require("rbe.http").post(self.base .. "/_respond", { json = rule })
end

function Recorder:reset()
  local http = require "rbe.http"
  http.delete(self.base .. "/_requests")
  http.delete(self.base .. "/_respond")
end

function Recorder:close()
  require("rbe.http").close_idle()
  self.srv:close()
end

-- the rbe binary under test (absolute path)
function M.rbe_bin()
  return os.getenv("RBE_BIN") or (rbe.whoami().cwd .. "/build/bin/rbe")
end

return M
