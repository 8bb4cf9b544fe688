-- bench/pg.lua URL N: rbe.pg on one connection to the local server, the
-- way bench_pg.sh compares it: N sequential db:query("SELECT 1") (each
-- waits for its answer), then N pipelined in one db:pipeline.  Prints
-- "seq SECONDS" and "pipe SECONDS" (connecting not included).
local rbe = require "rbe"
local pg = require "rbe.pg"
local url, N = arg[1], tonumber(arg[2] or 10000)

local db <close> = pg.connect(url)
assert(db:query("SELECT 1")[1]["?column?"] == 1)

local t0 = rbe.now()
for _ = 1, N do
  local r = db:query("SELECT 1")
  if r[1]["?column?"] ~= 1 then error("unexpected result") end
end
print(("seq %.6f"):format(rbe.now() - t0))

t0 = rbe.now()
local res = db:pipeline(function(p)
  for _ = 1, N do p:query("SELECT 1") end
end)
local pipe = rbe.now() - t0
assert(#res == N and res[N][1]["?column?"] == 1)
print(("pipe %.6f"):format(pipe))
