-- bench/startup.lua RBE FLOOR [N]: start-up time and peak RSS of
-- `rbe run bench/empty.lua` against two baselines measured in the same
-- loop, interleaved: `lua5.4 -e ''` and the floor program (same libraries,
-- an empty chunk on a uv loop).  Prints medians and ratios.
local rbe = require "rbe"
local proc = require "rbe.proc"

local RBE, FLOOR, N = arg[1], arg[2], tonumber(arg[3] or 200)
local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local cmds = {
  { name = "rbe run empty.lua", argv = { RBE, "run", here .. "/empty.lua" } },
  { name = "lua5.4 -e ''", argv = { "lua5.4", "-e", "" } },
  { name = "floor (same libs, uv loop)", argv = { FLOOR } },
}

local function median(t)
  table.sort(t)
  local n = #t
  return n % 2 == 1 and t[(n + 1) // 2] or (t[n // 2] + t[n // 2 + 1]) / 2
end

for _, c in ipairs(cmds) do c.times, c.rss = {}, {} ; proc.run(c.argv) end
for _ = 1, N do
  for _, c in ipairs(cmds) do
    local t0 = rbe.now()
    local r = proc.run(c.argv)
    c.times[#c.times + 1] = (rbe.now() - t0) * 1000
    if r.maxrss then c.rss[#c.rss + 1] = r.maxrss end
  end
end

print(("startup, %d runs each, interleaved (median wall ms incl. fork+exec+wait):"):format(N))
for _, c in ipairs(cmds) do
  c.med = median(c.times)
  local rss = #c.rss > 0 and ("  peak RSS %.1f MB"):format(median(c.rss) / 1024) or ""
  print(("  %-28s %7.2f ms%s"):format(c.name, c.med, rss))
end
print(("  ratio rbe / floor   = %.2fx (goal <= 1.2x)"):format(cmds[1].med / cmds[3].med))
print(("  ratio rbe / lua5.4  = %.2fx"):format(cmds[1].med / cmds[2].med))
if #cmds[1].rss > 0 then
  print(("  rbe peak RSS        = %.1f MB (goal <= 12 MB)"):format(median(cmds[1].rss) / 1024))
end
