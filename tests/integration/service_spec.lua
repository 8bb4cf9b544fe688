-- modules/service.lua against real tools: git on temp repositories
-- (checkout of a tag with local changes stashed, restore, the step's undo
-- through `rbe run`), builds (log file, failure, timeout, missing tool),
-- pm2 from tests/fixtures/node with a private PM2_HOME and a tiny Node app
-- (start, status, restart, stop; the stop step's undo), and the clear
-- errors of an absent systemd or Docker engine.
local rbe = require "rbe"
local json = require "rbe.json"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local support = require "support"
local service = require "service"

local ROOT = os.getenv("RBE_SOURCE_DIR") or rbe.whoami().cwd
local PM2 = ROOT .. "/tests/fixtures/node/node_modules/pm2/bin/pm2"
local RBE = support.rbe_bin()

local tmp

local GIT_ENV = { GIT_AUTHOR_NAME = "t", GIT_AUTHOR_EMAIL = "t@t", GIT_COMMITTER_NAME = "t",
                  GIT_COMMITTER_EMAIL = "t@t", GIT_CONFIG_GLOBAL = "/dev/null",
                  GIT_CONFIG_NOSYSTEM = "1" }

local function git(dir, ...)
  return (proc.run({ "git", "-C", dir, ... }, { env = GIT_ENV }).stdout:gsub("%s+$", ""))
end

-- a repository on branch main with tags v1 and v2 (HEAD at v2)
local function repo()
  local dir = tmp .. "/app"
  fs.mkdir(dir)
  git(dir, "init", "-q", "-b", "main")
  fs.write(dir .. "/VERSION", "v1\n")
  fs.write(dir .. "/.gitignore", ".env\n")
  git(dir, "add", "-A")
  git(dir, "commit", "-qm", "v1")
  git(dir, "tag", "v1")
  fs.write(dir .. "/VERSION", "v2\n")
  fs.write(dir .. "/feature.js", "// v2 only\n")
  git(dir, "add", "-A")
  git(dir, "commit", "-qm", "v2")
  git(dir, "tag", "v2")
  return dir, git(dir, "rev-parse", "v1"), git(dir, "rev-parse", "v2")
end

before_each(function() tmp = fs.tmpdir("rbe-service-") end)
after_each(function() if tmp then fs.remove(tmp, { recursive = true }) end end)

describe("#service git", function()
  it("reads the head: commit, branch and exact tag", function()
    local dir, _, v2 = repo()
    local g = service.git { dir = dir, env = GIT_ENV }
    assert.are.same({ sha = v2, branch = "main", tag = "v2" }, g:head())
    assert.are.equal(v2, g:rev())
    assert.are.same({}, g:changes())
  end)

  it("checks out a tag with local changes stashed first, and restores both", function()
    local dir, v1, v2 = repo()
    fs.write(dir .. "/VERSION", "v2 hotfix by hand\n")
    fs.write(dir .. "/notes.txt", "untracked\n")
    fs.write(dir .. "/.env", "SECRET=1\n")                 -- ignored: never stashed
    local g = service.git { dir = dir, env = GIT_ENV }
    assert.are.equal(2, #g:changes())
    local rec = g:checkout("v1")
    assert.are.equal(v1, rec.sha)
    assert.are.equal(v2, rec.previous)
    assert.are.equal("main", rec.previous_branch)
    assert.are.equal(2, rec.stashed)
    assert.are.equal(git(dir, "rev-parse", "stash@{0}"), rec.stash)
    assert.are.equal("v1\n", fs.read(dir .. "/VERSION"))
    assert.is_false(fs.exists(dir .. "/feature.js"))
    assert.is_false(fs.exists(dir .. "/notes.txt"))
    assert.are.equal("SECRET=1\n", fs.read(dir .. "/.env"))
    assert.is_nil(g:head().branch)                         -- detached at v1
    assert.are.equal(v2, g:restore(rec))
    assert.are.same({ sha = v2, branch = "main", tag = "v2" }, g:head())
    assert.are.equal("v2 hotfix by hand\n", fs.read(dir .. "/VERSION"))
    assert.are.equal("untracked\n", fs.read(dir .. "/notes.txt"))
    assert.are.equal("", git(dir, "stash", "list"))
  end)

  it("refuses an unknown ref, a dirty tree without stash, and a missing git", function()
    local dir = repo()
    local g = service.git { dir = dir, env = GIT_ENV }
    local err = support.raises(g.checkout, g, "v3")
    assert.are.equal("service", err.kind)
    assert.are.equal("ENOENT", err.code)
    assert.truthy(tostring(err):find("v3 is not a commit in " .. dir, 1, true), tostring(err))
    fs.write(dir .. "/VERSION", "dirty\n")
    err = support.raises(g.checkout, g, "v1", { stash = false })
    assert.are.equal("EDIRTY", err.code)
    assert.are.equal("dirty\n", fs.read(dir .. "/VERSION"))
    local nogit = service.git { dir = dir, git = tmp .. "/no/git" }
    err = support.raises(nogit.head, nogit)
    assert.are.equal("ENOENT", err.code)
    assert.truthy(tostring(err):find("is git installed", 1, true))
  end)

  it("git_checkout_step: a later failure undoes the checkout; rbe plan shows it", function()
    local dir, v1, v2 = repo()
    fs.write(dir .. "/VERSION", "local edit\n")
    local p = tmp .. "/pb.lua"
    fs.write(p, ([[
local pb = require "rbe.playbook"
local service = require "service"
local fs = require "rbe.fs"
return pb.playbook "git" {
  pb.step "checkout v1" (service.git_checkout_step { dir = %q, ref = "v1", env = %s }),
  pb.step "check" { run = function(ctx)
    fs.write(%q, fs.read(%q))
    error("smoke test failed")
  end },
}
]]):format(dir, "{ GIT_CONFIG_GLOBAL = '/dev/null', GIT_CONFIG_NOSYSTEM = '1' }",
      tmp .. "/seen", dir .. "/VERSION"))
    local plan = proc.run({ RBE, "plan", p }, { check = false })
    assert.are.equal(0, plan.code, plan.stderr)
    assert.truthy(plan.stdout:find("-> would check out v1 (" .. v1:sub(1, 12) .. ") in " .. dir
      .. ", now at main (" .. v2:sub(1, 12) .. ")", 1, true), plan.stdout)
    assert.truthy(plan.stdout:find("-> would stash 1 local change(s) first", 1, true), plan.stdout)
    local r = proc.run({ RBE, "run", p, "--state-dir", tmp .. "/state" }, { check = false,
      timeout = "60s" })
    assert.are.equal(1, r.code, r.stderr)
    assert.are.equal("v1\n", fs.read(tmp .. "/seen"))      -- the step saw v1
    assert.are.equal("main", git(dir, "symbolic-ref", "--short", "HEAD"))
    assert.are.equal("local edit\n", fs.read(dir .. "/VERSION"))
    assert.are.equal("", git(dir, "stash", "list"))
  end)
end)

describe("#service build", function()
  it("runs the commands in order, their output in the log", function()
    local log = tmp .. "/build.log"
    local r = service.build { dir = tmp, log = log, cmds = {
      { "sh", "-c", "echo installing; echo 'npm warn old' >&2" },
      { "sh", "-c", "echo built > dist.txt; echo done" } } }
    assert.are.equal(2, r.commands)
    assert.are.equal(log, r.log)
    local text = fs.read(log)
    assert.truthy(text:find("$ sh -c echo installing; echo 'npm warn old' >&2", 1, true), text)
    assert.truthy(text:find("installing\nnpm warn old\n# exit 0", 1, true), text)
    assert.truthy(text:find("done\n# exit 0", 1, true), text)
    assert.are.equal("built\n", fs.read(tmp .. "/dist.txt"))
  end)

  it("a failing command raises with the log and its last lines; the rest does not run", function()
    local log = tmp .. "/build.log"
    local err = support.raises(service.build, { dir = tmp, log = log, cmds = {
      { "sh", "-c", "echo step one; echo 'ERR! missing script: build' >&2; exit 2" },
      { "sh", "-c", "touch never" } } })
    assert.are.equal("service", err.kind)
    assert.are.equal(2, err.code)
    assert.are.equal(log, err.log)
    assert.truthy(tostring(err):find("exited 2 in " .. tmp .. " (log: " .. log .. ")", 1, true), tostring(err))
    assert.truthy(tostring(err):find("ERR! missing script: build", 1, true))
    assert.is_false(fs.exists(tmp .. "/never"))
    assert.truthy(fs.read(log):find("# exited 2", 1, true))
  end)

  it("a command over its timeout is killed: ETIMEDOUT; a missing tool: ENOENT", function()
    local err = support.raises(service.build, { dir = tmp, log = tmp .. "/b.log", timeout = "300ms",
      cmd = { "sh", "-c", "echo started; sleep 30" } })
    assert.are.equal("ETIMEDOUT", err.code)
    assert.truthy(tostring(err):find("timed out after 0.3s", 1, true), tostring(err))
    assert.truthy(tostring(err):find("started", 1, true))
    err = support.raises(service.build, { dir = tmp, log = tmp .. "/c.log", cmd = { "no-such-npm", "ci" } })
    assert.are.equal("ENOENT", err.code)
    assert.truthy(tostring(err):find("no-such-npm not found", 1, true))
  end)

  it("build_step writes its log into the run directory", function()
    local p = tmp .. "/pb.lua"
    fs.write(p, ([[
local pb = require "rbe.playbook"
local service = require "service"
return pb.playbook "build" {
  pb.step "npm build" (service.build_step { dir = %q, cmds = { { "sh", "-c", "echo compiled" } } }),
}
]]):format(tmp))
    local r = proc.run({ RBE, "run", p, "--state-dir", tmp .. "/state" }, { check = false })
    assert.are.equal(0, r.code, r.stderr)
    local id = fs.list(tmp .. "/state/runs")[1]
    local log = tmp .. "/state/runs/" .. id .. "/build-npm-build.log"
    assert.truthy(fs.read(log):find("compiled\n# exit 0", 1, true))
  end)
end)

describe("#service pm2", function()
  local home, p

  before_each(function()
    home = fs.tmpdir("/tmp/rbe-pm2-")          -- pm2's sockets need a short path
    fs.write(home .. "/touch", tostring(os.time()))   -- no first-run banner
    fs.write(tmp .. "/app.js", [[
const http = require('http');
http.createServer((q, r) => r.end('pid ' + process.pid)).listen(0, '127.0.0.1');
]])
    p = service.pm2 { pm2 = { "node", PM2 }, home = home }
  end)

  after_each(function()
    proc.run({ "node", PM2, "kill" }, { env = { PM2_HOME = home, PM2_DISABLE_VERSION_CHECK = "true" },
      check = false, timeout = "30s" })
    fs.remove(home, { recursive = true })
  end)

  it("starts, reports, restarts (new pid), stops and starts a Node app", function()
    assert.are.same({}, p:list())
    p:start(tmp .. "/app.js")
    local st = p:wait_online("app")
    assert.are.equal("online", st.status)
    assert.truthy(st.pid > 0)
    assert.are.equal(0, st.restarts)
    assert.is_nil(st.env)                       -- pm2_env never copied
    local r = p:restart("app")
    assert.are.equal(st.pid, r.pid_before)
    assert.are_not.equal(st.pid, r.pid)
    assert.are.equal(1, r.restarts)
    assert.are.equal("api", r.via)              -- restarted by the API helper
    assert.is_nil(r.env)
    local r2 = p:restart("app", { update_env = true })
    assert.are.equal(r.pid, r2.pid_before)
    assert.are.equal(2, r2.restarts)
    assert.are.same(r2.pid, p:status("app").pid)
    assert.are.equal("stopped", p:stop("app").status)
    local again = p:start("app")
    assert.are.equal("online", again.status)
    local err = support.raises(p.restart, p, "nope")
    assert.are.equal("ENOENT", err.code)
    assert.truthy(tostring(err):find("no process named nope", 1, true))
  end)

  it("restarts through the CLI when pm2 comes through a wrapper", function()
    local wrap = tmp .. "/pm2-wrapper"
    fs.write(wrap, ("#!/bin/sh\nexec node %s \"$@\"\n"):format(proc.quote(PM2)), { mode = "0755" })
    local w = service.pm2 { pm2 = wrap, home = home }
    p:start(tmp .. "/app.js")
    local st = p:wait_online("app")
    local r = w:restart("app")
    assert.are.equal("cli", r.via)              -- no pm2 package behind it
    assert.are.equal(st.pid, r.pid_before)
    assert.are_not.equal(st.pid, r.pid)
    assert.are.equal(1, r.restarts)
    assert.are.equal("ENOENT", support.raises(w.restart, w, "nope").code)
  end)

  it("pm2_stop_step: a later failure starts the app again", function()
    p:start(tmp .. "/app.js")
    local before = p:wait_online("app")
    local pbf = tmp .. "/pb.lua"
    fs.write(pbf, ([[
local pb = require "rbe.playbook"
local service = require "service"
local conf = { name = "app", pm2 = { "node", %q }, home = %q }
return pb.playbook "pm2" {
  pb.step "stop app" (service.pm2_stop_step(conf)),
  pb.step "fail" { run = function() error("boom") end },
}
]]):format(PM2, home))
    local r = proc.run({ RBE, "run", pbf, "--state-dir", tmp .. "/state" }, { check = false,
      timeout = "90s" })
    assert.are.equal(1, r.code, r.stderr)
    local st = p:status("app")
    assert.are.equal("online", st.status)
    assert.are_not.equal(before.pid, st.pid)
    local plan = proc.run({ RBE, "plan", pbf }, { check = false })
    assert.truthy(plan.stdout:find("-> would stop app (now online, pid " .. st.pid, 1, true), plan.stdout)
  end)

  it("a missing pm2 is a clear error", function()
    local none = service.pm2 { pm2 = tmp .. "/no/pm2", home = home }
    local err = support.raises(none.list, none)
    assert.are.equal("service", err.kind)
    assert.are.equal("ENOENT", err.code)
    assert.truthy(tostring(err):find("is pm2 installed", 1, true))
  end)
end)

describe("#service systemd and docker when absent", function()
  it("systemd: no systemd on the host, or no systemctl, is a clear error", function()
    local sd = service.systemd { runtime_dir = tmp .. "/no-systemd" }
    local err = support.raises(sd.restart, sd, "nginx.service")
    assert.are.equal("service", err.kind)
    assert.are.equal("ENOSYSTEMD", err.code)
    assert.truthy(tostring(err):find("this host is not running systemd", 1, true), tostring(err))
    assert.truthy(tostring(err):find("cannot restart nginx.service", 1, true), tostring(err))
    fs.mkdir(tmp .. "/run-systemd")
    local nosctl = service.systemd { runtime_dir = tmp .. "/run-systemd", systemctl = tmp .. "/no/systemctl" }
    err = support.raises(nosctl.status, nosctl, "nginx.service")
    assert.are.equal("ENOENT", err.code)
    assert.truthy(tostring(err):find("systemctl not found", 1, true), tostring(err))
  end)

  it("systemd: a systemctl that cannot reach systemd says so", function()
    -- a stand-in for systemctl on a host that was not booted with systemd
    local fake = tmp .. "/systemctl"
    fs.write(fake, "#!/bin/sh\necho 'System has not been booted with systemd as init system (PID 1). "
      .. "Can'\"'\"'t operate.' >&2\necho 'Failed to connect to bus: Host is down' >&2\nexit 1\n")
    fs.chmod(fake, "0755")
    fs.mkdir(tmp .. "/run-systemd")
    local sd = service.systemd { runtime_dir = tmp .. "/run-systemd", systemctl = fake }
    local err = support.raises(sd.stop, sd, "app.service")
    assert.are.equal("ENOSYSTEMD", err.code)
    assert.truthy(tostring(err):find("cannot stop app.service: systemd is not running here", 1, true),
      tostring(err))
  end)

  it("docker: a missing CLI and an unreachable engine are clear errors", function()
    local none = service.docker { docker = tmp .. "/no/docker" }
    local err = support.raises(none.ps, none)
    assert.are.equal("ENOENT", err.code)
    assert.truthy(tostring(err):find("is Docker installed on this host", 1, true), tostring(err))
    -- a docker CLI whose engine does not answer (as `docker` prints it)
    local fake = tmp .. "/docker"
    fs.write(fake, "#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///nonexistent.sock. "
      .. "Is the docker daemon running?' >&2\nexit 1\n")
    fs.chmod(fake, "0755")
    local d = service.docker { docker = fake, host = "unix:///nonexistent.sock" }
    err = support.raises(d.stop, d, "web")
    assert.are.equal("ENODOCKER", err.code)
    assert.truthy(tostring(err):find("cannot stop web: the Docker engine is not reachable", 1, true),
      tostring(err))
    err = support.raises(d.run, d, { image = "nginx:1.25", name = "web", ports = { "8080:80" } })
    assert.are.equal("ENODOCKER", err.code)
  end)

  it("docker: the real CLI against an engine that is not there", function()
    local ok = proc.run({ "sh", "-c", "command -v docker" }, { check = false }).code == 0
    if not ok then
      pending("no docker CLI on this host: the stand-in above covers the message")
      return
    end
    local d = service.docker { host = "unix://" .. tmp .. "/no-docker.sock" }
    local err = support.raises(d.ps, d)
    assert.are.equal("ENODOCKER", err.code, tostring(err))
  end)
end)
