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
  { name = "rbe empty.lua (no engine)", argv = { RBE, here .. "/empty.lua" } },
  { name = "lua5.4 -e ''", argv = { "lua5.4", "-e", "" } },
  { name = "floor (same libs, uv loop)", argv = { FLOOR } },
  { name = "floor + pq/curl/hiredis/edit", argv = { FLOOR:gsub("rbe%-floor$", "rbe-eager-floor") } },
}

local function median(t)
  table.sort(t)
  local n = #t
  return n % 2 == 1 and t[(n + 1) // 2] or (t[n // 2] + t[n // 2 + 1]) / 2
end

for _, c in ipairs(cmds) do c.times = {}; proc.run(c.argv) end
for _ = 1, N do
  for _, c in ipairs(cmds) do
    local t0 = rbe.now()
    proc.run(c.argv)
    c.times[#c.times + 1] = (rbe.now() - t0) * 1000
  end
end

print(("startup, %d runs each, interleaved (median wall ms incl. fork+exec+wait):"):format(N))
for _, c in ipairs(cmds) do
  c.med = median(c.times)
  print(("  %-28s %7.2f ms"):format(c.name, c.med))
end
print(("  ratio rbe run / floor            = %.2fx (goal <= 1.2x)"):format(cmds[1].med / cmds[4].med))
print(("  ratio rbe FILE / floor           = %.2fx (the core without the playbook engine)"):format(cmds[2].med / cmds[4].med))
print(("  ratio rbe run / lua5.4           = %.2fx"):format(cmds[1].med / cmds[3].med))
print(("  loading the clients' libraries at start would cost %.2f ms more per run"):format(cmds[5].med - cmds[4].med))
-- peak RSS as rbe itself sees it at the end of a run (VmHWM); wait4's
-- ru_maxrss is not usable here: children start as vfork-style clones and
-- inherit the parent's high-water mark
local hwm = {}
for i = 1, 20 do
  hwm[i] = tonumber(proc.run({ RBE, "run", here .. "/hwm.lua" }).stdout)
end
print(("  rbe peak RSS (VmHWM)  = %.1f MB (goal <= 12 MB)"):format(median(hwm) / 1024))
