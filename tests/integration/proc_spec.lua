-- rbe.proc on the real loop: run/sh, options, failures, timeouts,
-- cancellation, spawned children, concurrency, and that no child process
-- (or zombie) outlives what it should.  Needs no server.
local rbe = require "rbe"
local proc = require "rbe.proc"

local function tmpname()
  local p = os.tmpname()
  os.remove(p)
  return p
end

local function read_file(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- state letter and parent pid of a process, or nil when it is gone
local function stat(pid)
  local s = read_file("/proc/" .. pid .. "/stat")
  if not s then return nil end
  local state, ppid = s:match("%) (%S) (%d+)")
  return state, tonumber(ppid)
end

local function my_pid()
  return tonumber(assert(read_file("/proc/self/stat")):match("^(%d+)"))
end

-- a process is dead once it is gone or a zombie (an orphan may wait for
-- init to reap it); poll, since a kill takes effect on a later loop turn
local function wait_dead(pid, secs)
  local deadline = rbe.now() + (secs or 5)
  while rbe.now() < deadline do
    local st = stat(pid)
    if st == nil or st == "Z" then return true end
    rbe.sleep(0.02)
  end
  return false
end

local function wait_file(path, secs)
  local deadline = rbe.now() + (secs or 5)
  while rbe.now() < deadline do
    local s = read_file(path)
    if s and s:find("\n") then return s end
    rbe.sleep(0.01)
  end
  error("file never appeared: " .. path)
end

local function zombies_of(pid)
  -- processes may vanish between the glob and the read: cat then fails
  local out = proc.run({ "sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null" },
    { check = false }).stdout
  local z = {}
  for line in out:gmatch("[^\n]+") do
    local child, state, ppid = line:match("^(%d+) %(.*%) (%S) (%d+)")
    if state == "Z" and tonumber(ppid) == pid then z[#z + 1] = child end
  end
  return z
end

local raises = require("support").raises

describe("#proc proc.run and proc.sh", function()
  it("captures stdout, stderr, exit code, pid and elapsed", function()
    local r = proc.run({ "sh", "-c", "echo out; echo err >&2" })
    assert.are.equal("out\n", r.stdout)
    assert.are.equal("err\n", r.stderr)
    assert.are.equal(0, r.code)
    assert.is_nil(r.signal)
    assert.is_false(r.truncated)
    assert.is_true(math.type(r.pid) == "integer" and r.pid > 1)
    assert.is_true(r.elapsed >= 0 and r.elapsed < 60)
  end)

  it("passes argv verbatim: no shell, no splitting, no globbing", function()
    local r = proc.run({ "printf", "[%s]", "a b", "*", "$HOME", "'q'", "" })
    assert.are.equal("[a b][*][$HOME]['q'][]", r.stdout)
  end)

  it("proc.sh runs a command line through /bin/sh -c", function()
    local r = proc.sh("echo $((6 * 7)) | tr 4 x")
    assert.are.equal("x2\n", r.stdout)
  end)

  it("runs in cwd", function()
    local dir = tmpname()
    assert(os.execute("mkdir " .. dir))
    local r = proc.run({ "pwd" }, { cwd = dir })
    assert.are.equal(dir .. "\n", r.stdout)
    os.remove(dir)
    local err = raises(proc.run, { "pwd" }, { cwd = dir .. "/nope" })
    assert.are.equal("proc", err.kind)
    assert.are.equal("ENOENT", err.code)
    assert.truthy(err.message:find("cannot change directory", 1, true))
  end)

  it("merges env into the environment, false removes a variable", function()
    rbe.setenv("RBE_PROC_SPEC_KEEP", "kept")
    rbe.setenv("RBE_PROC_SPEC_DROP", "dropped")
    local r = proc.sh("echo $RBE_PROC_SPEC_KEEP/$RBE_PROC_SPEC_NEW/${RBE_PROC_SPEC_DROP-unset}",
      { env = { RBE_PROC_SPEC_NEW = 42, RBE_PROC_SPEC_DROP = false } })
    assert.are.equal("kept/42/unset\n", r.stdout)
    -- overriding an existing variable replaces it (once)
    r = proc.run({ "env" }, { env = { RBE_PROC_SPEC_KEEP = "new" } })
    local _, n = r.stdout:gsub("RBE_PROC_SPEC_KEEP=", "")
    assert.are.equal(1, n)
    assert.truthy(r.stdout:find("RBE_PROC_SPEC_KEEP=new\n", 1, true))
    rbe.setenv("RBE_PROC_SPEC_KEEP", nil)
    rbe.setenv("RBE_PROC_SPEC_DROP", nil)
  end)

  it("env_clear replaces the environment", function()
    local r = proc.run({ "/usr/bin/env" }, { env = { A = "1", B = "two" }, env_clear = true })
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    table.sort(lines)
    assert.are.same({ "A=1", "B=two" }, lines)
    -- without PATH in the new environment, a default PATH finds `env`
    r = proc.run({ "env" }, { env_clear = true })
    assert.are.equal("", r.stdout)
  end)

  it("feeds stdin, large inputs included, and gives /dev/null otherwise", function()
    local r = proc.run({ "tr", "a-z", "A-Z" }, { stdin = "hello\n" })
    assert.are.equal("HELLO\n", r.stdout)
    local big = ("0123456789abcdef"):rep(256 * 1024) -- 4 MiB both ways
    r = proc.run({ "cat" }, { stdin = big })
    assert.are.equal(#big, #r.stdout)
    assert.is_true(r.stdout == big)
    r = proc.run({ "cat" })
    assert.are.equal("", r.stdout)
    -- a child that does not read its stdin is fine
    r = proc.run({ "true" }, { stdin = big })
    assert.are.equal(0, r.code)
  end)

  it("accepts secrets in argv, env and stdin and never prints them", function()
    local pw = rbe.secret("hunter2")
    local r = proc.run({ "sh", "-c", 'echo "$1 $PW $(cat)"', "sh", pw },
      { env = { PW = pw }, stdin = pw })
    assert.are.equal("hunter2 hunter2 hunter2\n", r.stdout)
    local err = raises(proc.run, { "sh", "-c", "exit 1", "sh", pw })
    assert.are.equal(1, err.code)
    assert.is_nil(tostring(err):find("hunter2", 1, true))
    assert.truthy(err.message:find("***", 1, true))
    err = raises(proc.sh, rbe.secret("echo hunter2; exit 2"))
    assert.is_nil(tostring(err):find("hunter2", 1, true))
    assert.are.equal(2, err.code)
  end)

  it("check=true raises a proc error with the exit code, stderr tail and output", function()
    local err = raises(proc.sh, "echo partial; for i in 1 2 3 4 5 6 7; do echo line$i >&2; done; exit 3")
    assert.is_true(rbe.is_error(err))
    assert.are.equal("proc", err.kind)
    assert.are.equal(3, err.code)
    assert.is_false(err.retryable)
    assert.are.equal("partial\n", err.stdout)
    assert.truthy(err.stderr:find("line1\n", 1, true))
    assert.truthy(err.message:find("exited with code 3", 1, true))
    assert.truthy(err.message:find("line7", 1, true))   -- the tail...
    assert.is_nil(err.message:find("line1", 1, true))   -- ...not the head
    assert.truthy(tostring(err):find("^proc: "))
  end)

  it("check=false returns the result of a failing command", function()
    local r = proc.sh("echo nope >&2; exit 7", { check = false })
    assert.are.equal(7, r.code)
    assert.are.equal("nope\n", r.stderr)
    r = proc.sh("kill -KILL $$", { check = false })
    assert.are.equal("SIGKILL", r.signal)
    assert.are.equal(128 + 9, r.code)
  end)

  it("a command killed by a signal raises naming the signal", function()
    local err = raises(proc.sh, "kill -TERM $$")
    assert.are.equal("proc", err.kind)
    assert.are.equal(143, err.code)
    assert.are.equal("SIGTERM", err.signal)
    assert.truthy(err.message:find("killed by SIGTERM", 1, true))
  end)

  it("a missing executable raises ENOENT before anything starts", function()
    local before = proc._stats().children
    local err = rbe.timeout("5s", raises, proc.run, { "rbe-no-such-command-xyz", "arg" })
    assert.are.equal("proc", err.kind)
    assert.are.equal("ENOENT", err.code)
    assert.truthy(err.message:find("rbe-no-such-command-xyz", 1, true))
    assert.are.equal(before, proc._stats().children)
    -- with a path the exec itself fails, reported through the exec pipe
    err = rbe.timeout("5s", raises, proc.run, { "/nonexistent/dir/cmd" })
    assert.are.equal("ENOENT", err.code)
    assert.truthy(err.message:find("cannot execute", 1, true))
    -- not executable
    local f = tmpname()
    io.open(f, "w"):close()
    err = raises(proc.run, { f })
    assert.are.equal("EACCES", err.code)
    os.remove(f)
    -- spawn raises the same way
    err = raises(proc.spawn, { "rbe-no-such-command-xyz" })
    assert.are.equal("ENOENT", err.code)
  end)

  it("max_output with check=true raises after draining the child", function()
    local err = raises(proc.run, { "head", "-c", "1000000", "/dev/zero" }, { max_output = 1000 })
    assert.are.equal("proc", err.kind)
    assert.are.equal("EMSGSIZE", err.code)
    assert.truthy(err.message:find("max_output", 1, true))
    assert.are.equal(1000, #err.stdout)
    assert.are.equal(0, err.exit_code)
  end)

  it("max_output with check=false truncates and says so", function()
    local r = proc.run({ "head", "-c", "1000000", "/dev/zero" }, { max_output = 4096, check = false })
    assert.is_true(r.truncated)
    assert.are.equal(4096, #r.stdout)
    assert.are.equal(0, r.code)
    r = proc.sh("head -c 10 /dev/zero >&2", { max_output = 4, check = false })
    assert.are.equal(4, #r.stderr)
    assert.is_true(r.truncated)
  end)

  it("stdout/stderr can be discarded or merged", function()
    local r = proc.sh("echo o; echo e >&2", { stdout = "null" })
    assert.are.equal("", r.stdout)
    assert.are.equal("e\n", r.stderr)
    r = proc.sh("echo o; echo e >&2", { stderr = "stdout" })
    assert.are.equal("o\ne\n", r.stdout)
    assert.are.equal("", r.stderr)
  end)

  it("rejects unknown options and misuse with a usage error", function()
    local err = raises(proc.run, { "true" }, { timout = "1s" })
    assert.is_string(err)
    assert.truthy(err:find("unknown option 'timout'", 1, true))
    err = raises(proc.run, "ls -l")
    assert.truthy(err:find("proc.sh", 1, true))
    err = raises(proc.run, {})
    assert.truthy(err:find("empty", 1, true))
    err = raises(proc.run, { "true", {} })
    assert.truthy(err:find("argv[2]", 1, true))
    err = raises(proc.run, { "true" }, { timeout = "soon" })
    assert.truthy(err:find("bad duration", 1, true))
    err = raises(proc.sh, { "echo" })
    assert.truthy(err:find("command line string expected", 1, true))
  end)
end)

describe("#proc timeouts and cancellation", function()
  it("timeout kills the whole process tree and raises a timeout error", function()
    local err = raises(proc.sh, "sleep 30 & echo $!; wait", { timeout = "200ms" })
    assert.are.equal("timeout", err.kind)
    assert.are.equal("ETIMEDOUT", err.code)
    assert.is_true(err.retryable)
    assert.are.equal("SIGTERM", err.signal)
    local grandchild = tonumber(err.stdout:match("^(%d+)"))
    assert.is_number(grandchild)
    assert.is_true(wait_dead(grandchild), "sleep grandchild survived")
    assert.is_true(err.elapsed < 10)
  end)

  it("escalates to SIGKILL after kill_grace for a child ignoring SIGTERM", function()
    local t0 = rbe.now()
    local err = raises(proc.sh, "trap '' TERM; sleep 30 & echo $!; wait; wait",
      { timeout = "100ms", kill_grace = "300ms" })
    assert.are.equal("timeout", err.kind)
    assert.are.equal("SIGKILL", err.signal)
    local grandchild = tonumber(err.stdout:match("^(%d+)"))
    assert.is_true(wait_dead(grandchild))
    assert.is_true(rbe.now() - t0 < 10)
  end)

  it("cancelling the task kills the child", function()
    local pidfile = tmpname()
    local t = rbe.spawn(function()
      proc.sh("echo $$ > " .. pidfile .. "; sleep 30 & wait")
    end)
    local pid = tonumber(wait_file(pidfile))
    assert.is_not_nil(stat(pid))              -- running before the cancel
    t:cancel()
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.are.equal("cancelled", err.kind)
    assert.is_true(wait_dead(pid), "child survived its cancelled task")
    os.remove(pidfile)
  end)

  it("rbe.timeout around proc.run kills the child", function()
    local pidfile = tmpname()
    local t0 = rbe.now()
    local ok, err = pcall(rbe.timeout, "200ms", proc.run,
      { "sh", "-c", "echo $$ > " .. pidfile .. "; exec sleep 30" })
    assert.is_false(ok)
    assert.are.equal("timeout", err.kind)
    assert.is_true(rbe.now() - t0 < 5)
    local pid = tonumber(wait_file(pidfile))
    assert.is_true(wait_dead(pid), "child survived rbe.timeout")
    os.remove(pidfile)
  end)

  it("leaves no zombie behind", function()
    local me = my_pid()
    for _ = 1, 20 do proc.run({ "true" }) end
    local err = raises(proc.run, { "sleep", "30" }, { timeout = "50ms" })
    assert.are.equal("timeout", err.kind)
    local t = rbe.spawn(proc.run, { "sleep", "30" })
    rbe.sleep(0.05)
    t:cancel()
    pcall(t.join, t)
    do local c <close> = proc.spawn({ "sleep", "30" }) end
    -- the killed children are reaped on later loop turns
    local deadline = rbe.now() + 5
    while proc._stats().live > 0 and rbe.now() < deadline do rbe.sleep(0.01) end
    assert.are.equal(0, proc._stats().live)
    assert.are.same({}, zombies_of(me))
  end)
end)

describe("#proc proc.spawn", function()
  it("lines() yields lines as they arrive", function()
    local c <close> = proc.spawn({ "sh", "-c", "echo one; sleep 0.3; printf 'two\\r\\nthree'" })
    assert.is_true(math.type(c.pid) == "integer")
    local got, running_at_first = {}, nil
    for line in c:lines() do
      if #got == 0 then running_at_first = c:running() end
      got[#got + 1] = line
    end
    assert.is_true(running_at_first)          -- "one" came before the exit
    assert.are.same({ "one", "two", "three" }, got)
    local r = c:wait()
    assert.are.equal(0, r.code)
    assert.are.equal("", r.stdout)            -- lines() consumed it
  end)

  it("lines('stderr') reads stderr while stdout is drained", function()
    local c <close> = proc.spawn({ "sh", "-c", "head -c 3000000 /dev/zero; echo e1 >&2; echo e2 >&2" })
    local got = {}
    for line in c:lines("stderr") do got[#got + 1] = line end
    assert.are.same({ "e1", "e2" }, got)
    local r = c:wait()
    assert.is_true(r.truncated)               -- 3 MB > default 1 MiB buffer
    assert.are.equal(1024 * 1024, #r.stdout)
  end)

  it("write() and close_stdin() feed a pipe, with backpressure", function()
    local c <close> = proc.spawn({ "wc", "-c" }, { stdin = "pipe" })
    local chunk = ("x"):rep(1024 * 1024)
    c:write(chunk):write(chunk)
    c:write(rbe.secret("abc"))
    c:close_stdin()
    local r = c:wait()
    assert.are.equal(2 * #chunk + 3, tonumber(r.stdout))
    local err = raises(c.write, c, "more")
    assert.are.equal("EPIPE", err.code)
  end)

  it("an interactive child answers line by line", function()
    local c <close> = proc.spawn({ "sh", "-c", "while read x; do echo \"got $x\"; done" }, { stdin = "pipe" })
    local it = c:lines()
    c:write("a\n")
    assert.are.equal("got a", it())
    c:write("b\n")
    assert.are.equal("got b", it())
    c:close_stdin()
    assert.is_nil(it())
    assert.are.equal(0, c:wait().code)
  end)

  it("kill() signals the group and wait() reports the signal", function()
    local c <close> = proc.spawn({ "sh", "-c", "sleep 30 & echo $!; wait" })
    local grandchild = tonumber(c:lines()())
    assert.is_true(c:kill())
    -- our own signal: no error; and the whole group died, so the sleep
    -- did not keep stdout open (else this would time out)
    local r = rbe.timeout("5s", c.wait, c)
    assert.are.equal("SIGTERM", r.signal)
    assert.are.equal(143, r.code)
    assert.is_true(wait_dead(grandchild))
    assert.is_false(c:running())
    assert.is_false(c:kill("KILL"))           -- already gone
    assert.truthy(raises(c.kill, c, "SIGNOPE"):find("unknown signal", 1, true))
  end)

  it("wait() honours check", function()
    local c <close> = proc.spawn({ "sh", "-c", "echo bad >&2; exit 5" })
    local err = raises(c.wait, c)
    assert.are.equal("proc", err.kind)
    assert.are.equal(5, err.code)
    assert.truthy(err.message:find("bad", 1, true))
    local c2 <close> = proc.spawn({ "sh", "-c", "exit 5" }, { check = false })
    assert.are.equal(5, c2:wait().code)
    assert.are.equal(5, c2:wait().code)       -- again, at once
  end)

  it("__close kills a running child; closing twice is fine", function()
    local pid
    do
      local c <close> = proc.spawn({ "sleep", "30" })
      pid = c.pid
      assert.is_not_nil(stat(pid))
    end
    assert.is_true(wait_dead(pid))
    local c = proc.spawn({ "sleep", "30" })
    c:close()
    c:close()
    assert.is_true(wait_dead(c.pid))
    local r = proc.run({ "true" })            -- still usable afterwards
    assert.are.equal(0, r.code)
    assert.truthy(raises(c.lines, c):find("closed", 1, true))
  end)

  it("a collected handle kills its child", function()
    local pid = proc.spawn({ "sleep", "30" }).pid
    collectgarbage()
    collectgarbage()
    assert.is_true(wait_dead(pid))
  end)

  it("spawn timeout kills the child and wait() raises timeout", function()
    local c <close> = proc.spawn({ "sleep", "30" }, { timeout = "100ms" })
    local err = raises(c.wait, c)
    assert.are.equal("timeout", err.kind)
    assert.are.equal("SIGTERM", err.signal)
  end)

  it("a cancelled wait leaves the child running until closed", function()
    local c <close> = proc.spawn({ "sleep", "30" })
    local ok, err = pcall(rbe.timeout, "50ms", c.wait, c)
    assert.is_false(ok)
    assert.are.equal("timeout", err.kind)
    assert.is_true(c:running())
    c:close()
    assert.is_true(wait_dead(c.pid))
  end)
end)

describe("#proc concurrency", function()
  it("runs 200 commands through rbe.parallel with limit 16", function()
    local fns = {}
    for i = 1, 200 do
      fns[i] = function()
        return proc.run({ "sh", "-c", "echo $1; echo err$1 >&2", "sh", tostring(i) }).stdout
      end
    end
    local results = rbe.parallel(fns, { limit = 16 })
    assert.are.equal(200, results.n)
    for i = 1, 200 do assert.are.equal(i .. "\n", results[i]) end
  end)

  it("a failure in rbe.parallel cancels and kills the others", function()
    local pidfile = tmpname()
    local err = raises(rbe.parallel, {
      function() proc.sh("echo $$ > " .. pidfile .. "; exec sleep 30") end,
      function() wait_file(pidfile); proc.run({ "false" }) end,
    })
    assert.are.equal("proc", err.kind)
    assert.are.equal(1, err.code)
    assert.is_true(wait_dead(tonumber(wait_file(pidfile))))
    os.remove(pidfile)
  end)
end)

describe("#proc helpers", function()
  it("output() strips the final newline and quote() makes one shell word", function()
    assert.are.equal("a b", proc.output({ "echo", "a b" }))
    local tricky = "it's $HOME; `x` *"
    assert.are.equal(tricky .. "\n", proc.sh("printf '%s\\n' " .. proc.quote(tricky)).stdout)
    assert.are.equal("plain-word", proc.quote("plain-word"))
    assert.are.equal("''", proc.quote(""))
  end)
end)
