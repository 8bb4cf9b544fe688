-- rbe.fs on real files in a private temp directory per spec: every
-- function, its failure paths (error objects of kind "fs" with the errno
-- name as code), and tail following a log that another task writes,
-- truncates and rotates, under rbe.timeout and cancellation.
local rbe = require "rbe"
local fs = require "rbe.fs"

-- the error object raised by f(...), checked to be an fs error
local function fs_error(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected a failure")
  assert.is_true(rbe.is_error(err), "expected an error object, got " .. tostring(err))
  assert.are.equal("fs", err.kind)
  assert.is_false(err.retryable)
  return err
end

-- the plain (misuse) error message raised by f(...)
local function misuse(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, "expected a misuse error")
  assert.are.equal("string", type(err), "misuse must raise a plain error, got " .. tostring(err))
  return err
end

-- Run a Lua script in a child rbe (blocking; tests only) with `cwd`, as
-- the unprivileged user nobody when we are root, and return its output.
local is_root = io.popen("id -u"):read("l") == "0"
local function child_rbe(script, cwd)
  local pid = fs.read("/proc/self/stat"):match("^%d+")
  local exe = io.popen("readlink /proc/" .. pid .. "/exe"):read("l")
  assert(exe and exe:find("rbe$"), "cannot find the rbe binary")
  local cmd = exe .. " -"
  if is_root then
    cmd = "setpriv --reuid=65534 --regid=65534 --clear-groups " .. cmd
  end
  local p = io.popen("cd " .. cwd .. " && " .. cmd .. " 2>&1 <<'RBE_EOF'\n"
    .. script .. "\nRBE_EOF\n")
  local out = p:read("a")
  p:close()
  return out
end

-- open file descriptors of this process (Linux)
local function nfds() return #fs.list("/proc/self/fd") end

-- lines from a following tail until `last` shows up; a regression that
-- misses it fails after a few seconds instead of hanging the suite
local function follow_until(p, opts, last)
  local got = {}
  rbe.timeout("5s", function()
    for line in fs.tail(p, opts) do
      got[#got + 1] = line
      if line == last then break end
    end
  end)
  return got
end

local function collect(iter, state, init, closing)
  local out = {}
  for line in iter, state, init, closing do out[#out + 1] = line end
  return out
end

describe("#fs rbe.fs", function()
  local dir

  before_each(function()
    dir = fs.tmpdir("rbe-fs-spec-")
  end)

  after_each(function()
    fs.remove(dir, { recursive = true, missing_ok = true })
  end)

  describe("read and write", function()
    it("round-trips binary data, NUL bytes included", function()
      local bytes = {}
      for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
      local data = table.concat(bytes):rep(300)   -- 76800 bytes, > one read chunk
      fs.write(dir .. "/bin", data)
      local back = fs.read(dir .. "/bin")
      assert.are.equal(#data, #back)
      assert.is_true(back == data)
      assert.are.equal(#data, fs.stat(dir .. "/bin").size)
      fs.write(dir .. "/empty", "")
      assert.are.equal("", fs.read(dir .. "/empty"))
    end)

    it("reads files whose size stat does not know (/proc)", function()
      local status = fs.read("/proc/self/status")
      assert.truthy(status:find("^Name:"))
      assert.truthy(status:find("\nPid:%s+%d+"))
    end)

    it("writing over an existing file replaces it whole and leaves no temp file", function()
      local p = dir .. "/conf"
      fs.write(p, ("long line\n"):rep(100))
      local ino = fs.stat(p).ino
      fs.write(p, "short\n")
      assert.are.equal("short\n", fs.read(p))
      assert.are_not.equal(ino, fs.stat(p).ino)   -- a new file was renamed in
      assert.are.same({ "conf" }, fs.list(dir))
    end)

    it("keeps the permissions of the file it replaces unless a mode is given", function()
      local p = dir .. "/secret.conf"
      fs.write(p, "a", { mode = "0600" })
      assert.are.equal(tonumber("600", 8), fs.stat(p).mode)
      fs.write(p, "b")
      assert.are.equal(tonumber("600", 8), fs.stat(p).mode)
      fs.write(p, "c", { mode = tonumber("640", 8) })
      assert.are.equal(tonumber("640", 8), fs.stat(p).mode)
      fs.write(p, "d", { mode = "0o604" })
      assert.are.equal(tonumber("604", 8), fs.stat(p).mode)
      assert.are.equal("d", fs.read(p))
    end)

    it("refuses a decimal mode that was meant as octal", function()
      local err = misuse(fs.write, dir .. "/x", "data", { mode = 644 })
      assert.truthy(err:find("^fs.write: mode 644 is not a permission"))
      assert.truthy(err:find('"0644"', 1, true))
      assert.truthy(misuse(fs.write, dir .. "/x", "data", { mode = "rw-r--r--" })
        :find("^fs.write: mode 'rw%-r%-%-r%-%-' is not an octal permission"))
      assert.is_false(fs.exists(dir .. "/x"))
    end)

    it("writes the value inside a secret", function()
      local p = dir .. "/token"
      fs.write(p, rbe.secret("s3cr3t"), { mode = "0600" })
      assert.are.equal("s3cr3t", fs.read(p))
      fs.append(p, rbe.secret("!"))
      assert.are.equal("s3cr3t!", fs.read(p))
    end)

    it("writes through a symlink: the target changes, the link stays", function()
      fs.write(dir .. "/real", "v1")
      assert.is_true(os.execute("ln -s real " .. dir .. "/link"))
      fs.write(dir .. "/link", "v2")
      assert.are.equal("v2", fs.read(dir .. "/real"))
      assert.are.equal("link", fs.stat(dir .. "/link", { follow = false }).type)
      assert.are.same({ "link", "real" }, fs.list(dir))
    end)

    it("a missing file raises kind fs, code ENOENT, naming the operation and path", function()
      local p = dir .. "/nope"
      local err = fs_error(fs.read, p)
      assert.are.equal("ENOENT", err.code)
      assert.are.equal("fs.read " .. p .. ": No such file or directory", err.message)
      assert.are.equal("fs: fs.read " .. p .. ": No such file or directory (ENOENT)", tostring(err))
    end)

    it("reading a directory raises EISDIR", function()
      assert.are.equal("EISDIR", fs_error(fs.read, dir).code)
    end)

    it("a failed write raises and leaves no temp file behind", function()
      fs.write(dir .. "/file", "x")
      local err = fs_error(fs.write, dir .. "/file/child", "data")
      assert.are.equal("ENOTDIR", err.code)
      assert.truthy(err.message:find("fs.write " .. dir .. "/file/child", 1, true))
      err = fs_error(fs.write, dir .. "/missing/f", "data")
      assert.are.equal("ENOENT", err.code)
      -- the rename fails (a directory is in the way): the temp file goes
      fs.mkdir(dir .. "/sub/inner")
      err = fs_error(fs.write, dir .. "/sub", "data")
      assert.are.equal("EISDIR", err.code)
      assert.truthy(err.message:find("(rename)", 1, true))
      assert.are.same({ "file", "sub" }, fs.list(dir))
      assert.are.same({ "inner" }, fs.list(dir .. "/sub"))
    end)

    it("permission errors raise EACCES (checked as an unprivileged user)", function()
      fs.write(dir .. "/f", "x")
      local script = ([[
        local fs = require "rbe.fs"
        local d = %q
        for _, f in ipairs { function() return fs.read(d .. "/f") end,
                             function() return fs.write(d .. "/g", "x") end,
                             function() return fs.list(d) end,
                             function() return fs.exists(d .. "/f") end } do
          local ok, e = pcall(f)
          print(ok, rbe.is_error(e) and e.kind, rbe.is_error(e) and e.code)
        end
      ]]):format(dir)
      -- root passes permission checks: the child runs as nobody (our
      -- directory is 0700); otherwise take our own permissions away
      if not is_root then assert.is_true(os.execute("chmod 000 " .. dir)) end
      local out = child_rbe(script, "/")
      if not is_root then os.execute("chmod 700 " .. dir) end
      assert.are.equal(("false\tfs\tEACCES\n"):rep(4), out)
    end)
  end)

  describe("append", function()
    it("creates the file, then appends, fsync'd on request", function()
      local p = dir .. "/journal"
      fs.append(p, "one\n")
      fs.append(p, "two\n", { fsync = true })
      fs.append(p, "", { fsync = true })
      fs.append(p, "three\n", { fsync = false })
      assert.are.equal("one\ntwo\nthree\n", fs.read(p))
    end)

    it("applies mode to the file it creates, not to an existing one", function()
      local p = dir .. "/log"
      fs.append(p, "a", { mode = "0600" })
      assert.are.equal(tonumber("600", 8), fs.stat(p).mode)
      fs.append(p, "b", { mode = "0644" })
      assert.are.equal(tonumber("600", 8), fs.stat(p).mode)
      assert.are.equal("ab", fs.read(p))
    end)

    it("appends made by concurrent tasks all land", function()
      local p = dir .. "/shared"
      local fns = {}
      for i = 1, 4 do
        fns[i] = function()
          for j = 1, 5 do
            fs.append(p, ("t%d-%d\n"):format(i, j))
            rbe.sleep(0.001)
          end
        end
      end
      rbe.all(fns)
      local lines = collect(fs.lines(p))
      assert.are.equal(20, #lines)
      table.sort(lines)
      assert.are.equal("t1-1", lines[1])
      assert.are.equal("t4-5", lines[20])
    end)

    it("failures raise fs errors", function()
      assert.are.equal("ENOENT", fs_error(fs.append, dir .. "/no/such", "x").code)
      local err = fs_error(fs.append, dir, "x")
      assert.are.equal("EISDIR", err.code)
      assert.are.equal("fs.append " .. dir .. " (open): Is a directory", err.message)
    end)
  end)

  describe("exists and stat", function()
    it("exists tells files, directories and missing paths apart", function()
      fs.write(dir .. "/f", "x")
      assert.is_true(fs.exists(dir .. "/f"))
      assert.is_true(fs.exists(dir))
      assert.is_false(fs.exists(dir .. "/missing"))
      assert.is_false(fs.exists(dir .. "/f/under-a-file"))
      assert.is_true(os.execute("ln -s missing " .. dir .. "/dangling"))
      assert.is_false(fs.exists(dir .. "/dangling"))
    end)

    it("stat returns size, mode, mtime and type", function()
      local p = dir .. "/f"
      fs.write(p, "12345", { mode = "0640" })
      local st = fs.stat(p)
      assert.are.equal("file", st.type)
      assert.are.equal(5, st.size)
      assert.are.equal(tonumber("640", 8), st.mode)
      assert.is_number(st.mtime)
      assert.is_true(math.abs(st.mtime - rbe.time()) < 600)
      assert.is_true(math.type(st.ino) == "integer" and st.ino > 0)
      assert.are.equal(1, st.nlink)
      local d = fs.stat(dir)
      assert.are.equal("dir", d.type)
      assert.are.equal(tonumber("700", 8), d.mode)
      assert.are.equal("char", fs.stat("/dev/null").type)
    end)

    it("stat follows symlinks unless follow = false", function()
      fs.write(dir .. "/target", "abc")
      assert.is_true(os.execute("ln -s target " .. dir .. "/l"))
      assert.are.equal("file", fs.stat(dir .. "/l").type)
      assert.are.equal(3, fs.stat(dir .. "/l").size)
      local ls = fs.stat(dir .. "/l", { follow = false })
      assert.are.equal("link", ls.type)
      assert.are.equal(#"target", ls.size)
    end)

    it("stat of a missing path is nil", function()
      assert.is_nil(fs.stat(dir .. "/missing"))
      fs.write(dir .. "/f", "x")
      assert.is_nil(fs.stat(dir .. "/f/x"))
    end)
  end)

  describe("mkdir", function()
    it("creates missing parents and accepts an existing directory", function()
      fs.mkdir(dir .. "/a/b/c")
      assert.are.equal("dir", fs.stat(dir .. "/a/b/c").type)
      fs.mkdir(dir .. "/a/b/c")
      fs.mkdir(dir .. "/a//b/d/")
      assert.are.same({ "c", "d" }, fs.list(dir .. "/a/b"))
    end)

    it("applies mode to the directory it creates", function()
      -- exactly, like mkdir -m: the umask does not take bits away
      fs.mkdir(dir .. "/p/q", { mode = "0777" })
      assert.are.equal(tonumber("777", 8), fs.stat(dir .. "/p/q").mode)
      fs.mkdir(dir .. "/p/r", { mode = tonumber("700", 8) })
      assert.are.equal(tonumber("700", 8), fs.stat(dir .. "/p/r").mode)
    end)

    it("fails when a file is in the way", function()
      fs.write(dir .. "/f", "x")
      local err = fs_error(fs.mkdir, dir .. "/f/sub")
      assert.are.equal("ENOTDIR", err.code)
      assert.truthy(err.message:find("(at " .. dir .. "/f)", 1, true))
      assert.are.equal("EEXIST", fs_error(fs.mkdir, dir .. "/f").code)
    end)
  end)

  describe("list", function()
    it("returns sorted names without . and .., hidden files included", function()
      for _, n in ipairs { "b", "a", ".hidden", "C", "a2" } do fs.write(dir .. "/" .. n, "") end
      fs.mkdir(dir .. "/d")
      assert.are.same({ ".hidden", "C", "a", "a2", "b", "d" }, fs.list(dir))
      assert.are.same({}, fs.list(dir .. "/d"))
    end)

    it("fails on a missing directory and on a file", function()
      assert.are.equal("ENOENT", fs_error(fs.list, dir .. "/missing").code)
      fs.write(dir .. "/f", "")
      assert.are.equal("ENOTDIR", fs_error(fs.list, dir .. "/f").code)
    end)
  end)

  describe("remove", function()
    it("removes a file and an empty directory", function()
      fs.write(dir .. "/f", "x")
      fs.mkdir(dir .. "/d")
      assert.is_true(fs.remove(dir .. "/f"))
      assert.is_true(fs.remove(dir .. "/d"))
      assert.are.same({}, fs.list(dir))
    end)

    it("refuses a non-empty directory unless recursive", function()
      fs.mkdir(dir .. "/t/u/v")
      fs.write(dir .. "/t/u/v/f", "x")
      fs.write(dir .. "/t/g", "y")
      assert.are.equal("ENOTEMPTY", fs_error(fs.remove, dir .. "/t").code)
      assert.is_true(fs.remove(dir .. "/t", { recursive = true }))
      assert.is_false(fs.exists(dir .. "/t"))
    end)

    it("recursive removal removes symlinks, not what they point to", function()
      fs.mkdir(dir .. "/keep")
      fs.write(dir .. "/keep/precious", "data")
      fs.mkdir(dir .. "/t")
      assert.is_true(os.execute("ln -s ../keep " .. dir .. "/t/link"))
      fs.remove(dir .. "/t", { recursive = true })
      assert.is_false(fs.exists(dir .. "/t"))
      assert.are.equal("data", fs.read(dir .. "/keep/precious"))
    end)

    it("a missing path raises ENOENT, or returns false with missing_ok", function()
      assert.are.equal("ENOENT", fs_error(fs.remove, dir .. "/missing").code)
      assert.are.equal("ENOENT", fs_error(fs.remove, dir .. "/missing", { recursive = true }).code)
      assert.is_false(fs.remove(dir .. "/missing", { missing_ok = true }))
      assert.is_false(fs.remove(dir .. "/missing", { recursive = true, missing_ok = true }))
    end)

    it("refuses to remove /, . and .. recursively", function()
      fs.mkdir(dir .. "/a/b")
      for _, p in ipairs { dir .. "/a/b/..", dir .. "/a/.", dir .. "/a/./" } do
        local err = misuse(fs.remove, p, { recursive = true })
        assert.are.equal("fs.remove: refusing to remove '" .. p .. "' recursively", err)
      end
      assert.are.equal("dir", fs.stat(dir .. "/a/b").type)
      -- "/", "." and ".." for real only in a child running as nobody from
      -- /, where a broken guard fails at its first unlink instead of
      -- wiping anything
      if is_root then
        local out = child_rbe([[
          for _, p in ipairs { "/", "//", ".", "./", "..", "../" } do
            local ok, err = pcall(require("rbe.fs").remove, p, { recursive = true })
            print(ok, err)
          end
        ]], "/")
        local want = {}
        for _, p in ipairs { "/", "//", ".", "./", "..", "../" } do
          want[#want + 1] = "false\tfs.remove: refusing to remove '" .. p .. "' recursively\n"
        end
        assert.are.equal(table.concat(want), out)
      end
    end)
  end)

  describe("tmpdir", function()
    it("creates a new private directory each time", function()
      local a, b = fs.tmpdir("rbe-fs-spec-x-"), fs.tmpdir("rbe-fs-spec-x-")
      assert.are_not.equal(a, b)
      for _, d in ipairs { a, b } do
        assert.truthy(d:find("/rbe%-fs%-spec%-x%-[^/]+$"))
        local st = fs.stat(d)
        assert.are.equal("dir", st.type)
        assert.are.equal(tonumber("700", 8), st.mode)
        fs.remove(d)
      end
    end)

    it("takes a path prefix and fails where it cannot create", function()
      local d = fs.tmpdir(dir .. "/mine-")
      assert.are.equal(dir .. "/mine-", d:sub(1, #dir + 6))
      assert.are.equal("dir", fs.stat(d).type)
      assert.are.equal("ENOENT", fs_error(fs.tmpdir, dir .. "/missing/x-").code)
    end)
  end)

  describe("lines", function()
    it("iterates lines without their newline, CRLF and a last unterminated line included", function()
      fs.write(dir .. "/f", "one\r\ntwo\n\nfour\nlast")
      assert.are.same({ "one", "two", "", "four", "last" }, collect(fs.lines(dir .. "/f")))
      fs.write(dir .. "/g", "a\n")
      assert.are.same({ "a" }, collect(fs.lines(dir .. "/g")))
      fs.write(dir .. "/e", "")
      assert.are.same({}, collect(fs.lines(dir .. "/e")))
    end)

    it("handles lines across read chunks", function()
      local want = {}
      for i = 1, 5000 do want[i] = ("line %d %s"):format(i, ("x"):rep(i % 97)) end
      fs.write(dir .. "/big", table.concat(want, "\n") .. "\n")
      assert.are.same(want, collect(fs.lines(dir .. "/big")))
    end)

    it("closes the file when the loop breaks or ends", function()
      fs.write(dir .. "/f", "a\nb\nc\n")
      local before = nfds()
      for line in fs.lines(dir .. "/f") do
        assert.are.equal(before + 1, nfds())
        if line == "b" then break end
      end
      assert.are.equal(before, nfds())
      collect(fs.lines(dir .. "/f"))
      assert.are.equal(before, nfds())
      -- called by hand, outside a for: closed when the lines run out
      local next_line = fs.lines(dir .. "/f")
      assert.are.equal("a", next_line())
      assert.are.equal(before + 1, nfds())
      assert.are.equal("b", next_line())
      assert.are.equal("c", next_line())
      assert.is_nil(next_line())
      assert.are.equal(before, nfds())
      assert.is_nil(next_line())
    end)

    it("a missing file raises ENOENT at the call", function()
      local err = fs_error(fs.lines, dir .. "/missing")
      assert.are.equal("ENOENT", err.code)
      assert.truthy(err.message:find("^fs.lines "))
    end)
  end)

  describe("tail", function()
    it("without follow returns the existing lines and ends", function()
      local p = dir .. "/log"
      fs.write(p, "a\nb\npartial")
      assert.are.same({ "a", "b", "partial" }, collect(fs.tail(p)))
      assert.are.same({}, collect(fs.tail(p, { from = "end" })))
    end)

    it("follows lines appended by another task", function()
      local p = dir .. "/log"
      fs.write(p, "before\n")
      local writer = rbe.spawn(function()
        for i = 1, 3 do
          rbe.sleep("10ms")
          fs.append(p, "line " .. i .. "\n")
        end
        rbe.sleep("10ms")
        fs.append(p, "half of ")          -- a line written in two pieces
        rbe.sleep("10ms")
        fs.append(p, "a line\nlast\n")
      end)
      local got = follow_until(p, { follow = true, poll = "2ms" }, "last")
      writer:join()
      assert.are.same({ "line 1", "line 2", "line 3", "half of a line", "last" }, got)
    end)

    it("from = start with follow returns the existing lines first", function()
      local p = dir .. "/log"
      fs.write(p, "old\n")
      local writer = rbe.spawn(function() rbe.sleep("10ms"); fs.append(p, "new\n") end)
      local got = follow_until(p, { follow = true, from = "start", poll = "2ms" }, "new")
      writer:join()
      assert.are.same({ "old", "new" }, got)
    end)

    it("starts again from the top when the file is truncated", function()
      local p = dir .. "/log"
      fs.write(p, "")
      local writer = rbe.spawn(function()
        rbe.sleep("10ms")
        fs.append(p, "a long line before the truncation\n")
        rbe.sleep("20ms")
        local f = assert(io.open(p, "w"))   -- copytruncate: same file, size 0
        f:close()
        rbe.sleep("20ms")
        fs.append(p, "after\n")
      end)
      local ino = fs.stat(p).ino
      local got = follow_until(p, { follow = true, poll = "2ms" }, "after")
      writer:join()
      assert.are.equal(ino, fs.stat(p).ino)
      assert.are.same({ "a long line before the truncation", "after" }, got)
    end)

    it("follows a rotation to the new file after reading the rest of the old one", function()
      local p = dir .. "/log"
      fs.write(p, "")
      local writer = rbe.spawn(function()
        rbe.sleep("10ms")
        fs.append(p, "a\n")
        rbe.sleep("20ms")
        fs.append(p, "b\nunfinished")
        assert(os.rename(p, p .. ".1"))
        rbe.sleep("20ms")                   -- the path is missing meanwhile
        fs.append(p, "c\n")
        rbe.sleep("20ms")
        fs.append(p .. ".1", "never read\n")  -- the old file is done with
        fs.append(p, "d\n")
      end)
      local got = follow_until(p, { follow = true, poll = "2ms" }, "d")
      writer:join()
      assert.are.same({ "a", "b", "unfinished", "c", "d" }, got)
    end)

    it("stops with a timeout error under rbe.timeout and closes its file", function()
      local p = dir .. "/log"
      fs.write(p, "")
      local before = nfds()
      local writer = rbe.spawn(function()
        rbe.sleep("5ms")
        fs.append(p, "ERROR one\nINFO two\nERROR three\n")
      end)
      local errors = 0
      local ok, err = pcall(rbe.timeout, "100ms", function()
        for line in fs.tail(p, { follow = true, poll = "5ms" }) do
          if line:find("ERROR", 1, true) then errors = errors + 1 end
        end
      end)
      writer:join()
      assert.is_false(ok)
      assert.are.equal("timeout", err.kind)
      assert.are.equal(2, errors)
      assert.are.equal(before, nfds())
    end)

    it("ends by itself after duration", function()
      local p = dir .. "/log"
      fs.write(p, "")
      local writer = rbe.spawn(function()
        rbe.sleep("5ms")
        fs.append(p, "x\ny\n")
      end)
      local got = rbe.timeout("5s", collect,
        fs.tail(p, { follow = true, poll = "5ms", duration = "80ms" }))
      writer:join()
      assert.are.same({ "x", "y" }, got)
    end)

    it("a cancelled task stops tailing and closes its file", function()
      local p = dir .. "/log"
      fs.write(p, "")
      local before = nfds()
      local seen = 0
      local t = rbe.spawn(function()
        for _ in fs.tail(p, { follow = true, poll = "5ms" }) do seen = seen + 1 end
      end)
      rbe.sleep("10ms")
      fs.append(p, "one\n")
      rbe.sleep("30ms")
      t:cancel()
      local ok, err = pcall(t.join, t)
      assert.is_false(ok)
      assert.are.equal("cancelled", err.kind)
      assert.are.equal("cancelled", t:status())
      assert.are.equal(1, seen)
      assert.are.equal(before, nfds())
    end)

    it("can be driven from inside a user coroutine", function()
      local p = dir .. "/log"
      fs.write(p, "")
      local before = nfds()
      local writer = rbe.spawn(function()
        rbe.sleep("10ms")
        fs.append(p, "1\n2\n3\n")
      end)
      local co = coroutine.create(function()
        for line in fs.tail(p, { follow = true, poll = "2ms" }) do
          coroutine.yield(tonumber(line))
        end
      end)
      local got = {}
      for i = 1, 3 do
        local ok, n = coroutine.resume(co)
        assert.is_true(ok, tostring(n))
        got[i] = n
      end
      writer:join()
      assert.are.same({ 1, 2, 3 }, got)
      assert.are.equal(before + 1, nfds())
      assert.is_true(coroutine.close(co))   -- runs the loop's closing value
      assert.are.equal(before, nfds())
    end)

    it("a missing file raises ENOENT; bad options raise plain errors", function()
      local err = fs_error(fs.tail, dir .. "/missing", { follow = true })
      assert.are.equal("ENOENT", err.code)
      assert.truthy(err.message:find("^fs.tail "))
      local p = dir .. "/log"
      fs.write(p, "")
      assert.truthy(misuse(fs.tail, p, { from = "middle" }):find("fs.tail: option 'from'", 1, true))
      assert.truthy(misuse(fs.tail, p, { follow = true, poll = "soon" }):find("fs.tail: option 'poll'", 1, true))
      assert.truthy(misuse(fs.tail, p, { follow = true, poll = 0 }):find("fs.tail: option 'poll' must be positive", 1, true))
      assert.truthy(misuse(fs.tail, p, { duration = "1s" }):find("needs follow = true", 1, true))
      assert.truthy(misuse(fs.tail, p, { folow = true }):find("fs.tail: unknown option 'folow'", 1, true))
      assert.truthy(misuse(fs.tail, p, "follow"):find("fs.tail: options must be a table", 1, true))
    end)
  end)

  describe("misuse", function()
    it("wrong argument types raise plain errors naming the function", function()
      local cases = {
        { "fs.read", fs.read },
        { "fs.write", fs.write, nil, "x" },
        { "fs.append", fs.append, 1, "x" },
        { "fs.exists", fs.exists, {} },
        { "fs.stat", fs.stat, true },
        { "fs.mkdir", fs.mkdir },
        { "fs.list", fs.list, 42 },
        { "fs.remove", fs.remove },
        { "fs.lines", fs.lines },
        { "fs.tail", fs.tail },
      }
      for _, c in ipairs(cases) do
        local err = misuse(c[2], c[3], c[4])
        local want = c[1] .. ": path must be a string, got " .. type(c[3])
        assert.truthy(err:find(want, 1, true), err)
      end
      assert.are.equal("fs.read: path is empty", misuse(fs.read, ""))
      assert.are.equal("fs.read: path contains a NUL byte", misuse(fs.read, "a\0b"))
      assert.are.equal("fs.write: data must be a string, got table", misuse(fs.write, dir .. "/f", {}))
      assert.are.equal("fs.append: data must be a string, got nil", misuse(fs.append, dir .. "/f"))
      assert.are.equal("fs.write: options must be a table, got string", misuse(fs.write, dir .. "/f", "x", "0644"))
      assert.are.equal("fs.remove: unknown option 'recursve'", misuse(fs.remove, dir, { recursve = true }))
      assert.are.equal("fs.tmpdir: prefix must be a string, got number", misuse(fs.tmpdir, 1))
      assert.are.same({}, fs.list(dir))
    end)
  end)
end)
