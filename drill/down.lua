-- drill/down.lua: stop a drill environment started by drill/up.lua and
-- remove its state directory.
--
--   build/bin/rbe drill/down.lua STATE_DIR
--
-- Idempotent: a missing STATE_DIR is fine, and so is one that up.lua left
-- half-built.  pm2 is told to stop first (so it does not restart the app),
-- then every process carrying this drill's owner mark gets SIGTERM and,
-- after 5 s, SIGKILL; PostgreSQL and Redis are stopped by
-- tests/fixtures/servers.sh.  A directory that up.lua did not make is
-- refused.  Exit 0 when everything is gone, 1 otherwise.
local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
if here:sub(1, 1) ~= "/" then here = rbe.whoami().cwd .. "/" .. here end
local D = dofile(here .. "/lib.lua")

local state = D.abspath(arg and arg[1])
if not state or state == "/" then
  io.stderr:write("usage: rbe drill/down.lua STATE_DIR\n")
  os.exit(2)
end

local ok, err = pcall(D.down, state)
if not ok then
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
