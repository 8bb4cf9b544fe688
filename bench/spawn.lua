-- bench/spawn.lua [N]: process spawning.  N sequential proc.run{"/bin/true"}
-- against the baseline of a bash loop running /bin/true N times (timed by
-- the same clock), then the same N through rbe.parallel with limit 16.
local rbe = require "rbe"
local proc = require "rbe.proc"
local N = tonumber(arg[1] or 1000)

proc.run { "/bin/true" }
local t0 = rbe.now()
for _ = 1, N do proc.run { "/bin/true" } end
local seq = rbe.now() - t0

t0 = rbe.now()
proc.run { "bash", "-c", ("for i in $(seq %d); do /bin/true; done"):format(N) }
local bash = rbe.now() - t0

local fns = {}
for i = 1, N do fns[i] = function() return proc.run { "/bin/true" } end end
t0 = rbe.now()
rbe.parallel(fns, { limit = 16 })
local par = rbe.now() - t0

print(("spawning %d x /bin/true:"):format(N))
print(("  rbe proc.run sequential      %7.0f /s  (%.3f s)"):format(N / seq, seq))
print(("  bash loop (baseline)         %7.0f /s  (%.3f s)"):format(N / bash, bash))
print(("  rbe.parallel limit 16        %7.0f /s  (%.3f s)"):format(N / par, par))
print(("  ratio rbe sequential / bash  = %.2fx (goal >= 1.0x)"):format(bash / seq))
print(("  ratio parallel / sequential  = %.2fx"):format(seq / par))
