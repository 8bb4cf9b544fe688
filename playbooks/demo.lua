-- playbooks/demo.lua: `make demo` runs this with `rbe run`.  A small
-- rollback drill on tasks and processes only (the full drill against a
-- throwaway PostgreSQL/Redis/app stack replaces it once the playbook engine
-- and modules land).  It sets up a fake "app" directory in a temp dir,
-- "deploys" a bad v2, then rolls back to v1 the way a runbook would:
-- concurrent independent steps, a timeout on every wait, a process that
-- hangs and is killed, and a health poll until the old version answers.
local rbe = require "rbe"
local proc = require "rbe.proc"
local fs = require "rbe.fs"

local t0 = rbe.now()
local function step(name, fn, ...)
  local s = rbe.now()
  io.write(("[%6.2fs] %-44s"):format(s - t0, name)); io.flush()
  local ok, err = rbe.try(fn, ...)
  io.write(ok and "ok" or ("FAILED: " .. tostring(err)),
           ("  (%.0f ms)\n"):format((rbe.now() - s) * 1000))
  if not ok then error(err, 0) end
  return err
end

local dir = fs.tmpdir("rbe-demo-")
local app = dir .. "/app"
local c <close> = setmetatable({}, { __close = function()
  fs.remove(dir, { recursive = true })
end })

step("prepare app with v1 and v2 tags", function()
  fs.mkdir(app)
  local git = function(...) return proc.run({ "git", ... }, { cwd = app, timeout = "10s",
    env = { GIT_AUTHOR_NAME = "rbe", GIT_AUTHOR_EMAIL = "rbe@localhost",
            GIT_COMMITTER_NAME = "rbe", GIT_COMMITTER_EMAIL = "rbe@localhost" } }) end
  git("init", "-q")
  fs.write(app .. "/VERSION", "v1\n")
  git("add", "VERSION"); git("commit", "-qm", "v1"); git("tag", "v1")
  fs.write(app .. "/VERSION", "v2\n")
  git("commit", "-qam", "v2"); git("tag", "v2")
end)

step("confirm v2 is live (the bad deploy)", function()
  local v = fs.read(app .. "/VERSION")
  assert(v == "v2\n", "expected v2, got " .. v)
end)

-- Independent steps run concurrently; each has its own timeout.
step("pause workers + snapshot state (parallel)", function()
  rbe.all {
    function() proc.sh("sleep 0.3; echo paused > " .. dir .. "/workers", { timeout = "5s" }) end,
    function()
      proc.run({ "tar", "-C", app, "-czf", dir .. "/snapshot.tgz", "." }, { timeout = "30s" })
    end,
  }
end)

step("a hung step is killed by its timeout", function()
  local ok, err = rbe.try(proc.sh, "sleep 60 & wait", { timeout = "300ms", kill_grace = "1s" })
  assert(not ok and err.kind == "timeout", "the hung step should have timed out")
end)

step("git checkout v1", function()
  proc.run({ "git", "checkout", "-q", "v1" }, { cwd = app, timeout = "30s" })
end)

step("poll health until v1 answers 3x in a row", function()
  local passes = 0
  rbe.timeout("10s", function()
    while passes < 3 do
      local v = fs.read(app .. "/VERSION")
      passes = (v == "v1\n") and passes + 1 or 0
      rbe.sleep("50ms")
    end
  end)
end)

step("resume workers", function()
  proc.sh("echo running > " .. dir .. "/workers", { timeout = "5s" })
end)

print(("rolled back to %s in %.2fs"):format(fs.read(app .. "/VERSION"):gsub("\n", ""),
  rbe.now() - t0))
