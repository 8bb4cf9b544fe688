-- bench/playbook.lua RBE [N]: the playbook engine's overhead.
--  1. N no-op steps through `rbe run` (journal with fsync, and --no-fsync),
--     per step, against the named baseline of the same N no-op functions
--     called in a plain loop by `rbe FILE` (start-up and loop only);
--  2. 20 trivial local commands (/bin/true) as an rbe playbook vs the same
--     as an Ansible playbook (connection: local, gather_facts: no), if
--     ansible-playbook is installed (bench_playbook.sh installs it).
local rbe = require "rbe"
local proc = require "rbe.proc"
local fs = require "rbe.fs"

local RBE, N = arg[1], tonumber(arg[2] or 1000)
if RBE:sub(1, 1) ~= "/" then RBE = rbe.whoami().cwd .. "/" .. RBE end
local dir = fs.tmpdir("rbe-bench-pb-")

local function write(name, text) fs.write(dir .. "/" .. name, text) return dir .. "/" .. name end

local steps = {}
for i = 1, N do steps[#steps + 1] = ('  pb.step "s%d" { run = function() end },'):format(i) end
local noop = write("noop.lua", 'local pb = require "rbe.playbook"\nreturn pb.playbook "noop" {\n'
  .. table.concat(steps, "\n") .. "\n}\n")
local loop = write("loop.lua", ("local f = function() end\nfor i = 1, %d do f() end\n"):format(N))

local function time(argv, runs)
  local best = math.huge
  for _ = 1, runs or 3 do
    local t0 = rbe.now()
    proc.run(argv, { cwd = dir, env = { RBE_STATE_DIR = dir .. "/state" }, timeout = "10m" })
    best = math.min(best, rbe.now() - t0)
  end
  return best
end

local base = time({ RBE, loop })
local nofsync = time({ RBE, "run", noop, "-q", "--no-fsync" })
local withfsync = time({ RBE, "run", noop, "-q" })
print(("%d no-op steps (best of 3 wall times):"):format(N))
print(("  baseline: rbe FILE, plain loop      %8.1f ms"):format(base * 1000))
print(("  rbe run, journal without fsync      %8.1f ms  -> %.3f ms/step over baseline (goal <= 0.2)")
  :format(nofsync * 1000, (nofsync - base) * 1000 / N))
print(("  rbe run, journal with fsync         %8.1f ms  -> fsync adds %.3f ms/step")
  :format(withfsync * 1000, (withfsync - nofsync) * 1000 / N))

-- 20 trivial local commands
local cmds = {}
for i = 1, 20 do cmds[#cmds + 1] = ('  pb.step "c%d" { run = function() proc.run { "/bin/true" } end },'):format(i) end
local twenty = write("twenty.lua", 'local pb = require "rbe.playbook"\nlocal proc = require "rbe.proc"\n'
  .. 'return pb.playbook "twenty" {\n' .. table.concat(cmds, "\n") .. "\n}\n")
local rbe20 = time({ RBE, "run", twenty, "-q" }, 5)
print(("20 local commands as an rbe playbook     %8.1f ms  (%.2f ms/step)"):format(rbe20 * 1000, rbe20 * 1000 / 20))

local has_ansible = proc.run({ "sh", "-c", "command -v ansible-playbook" }, { check = false }).code == 0
if has_ansible then
  local tasks = { "- hosts: localhost", "  connection: local", "  gather_facts: no", "  tasks:" }
  for i = 1, 20 do
    tasks[#tasks + 1] = ("    - name: c%d\n      command: /bin/true"):format(i)
  end
  local yml = write("twenty.yml", table.concat(tasks, "\n") .. "\n")
  local inv = write("inventory", "localhost ansible_connection=local\n")
  local a0 = time({ "ansible-playbook", "-i", inv, yml }, 1)
  local empty = write("empty.yml", "- hosts: localhost\n  connection: local\n  gather_facts: no\n  tasks: []\n")
  local a_empty = time({ "ansible-playbook", "-i", inv, empty }, 1)
  local per_task = (a0 - a_empty) / 20
  local rbe_empty = write("one.lua", 'local pb = require "rbe.playbook"\nreturn pb.playbook "one" { pb.step "x" { run = function() end } }\n')
  local r_empty = time({ RBE, "run", rbe_empty, "-q" }, 5)
  local rbe_per = (rbe20 - r_empty) / 20
  print(("20 local commands as an Ansible playbook %8.1f ms  (start-up %.0f ms, %.1f ms/task)")
    :format(a0 * 1000, a_empty * 1000, per_task * 1000))
  print(("  per-step overhead ratio Ansible / rbe = %.0fx (goal >= 150x)"):format(per_task / rbe_per))
  print(("  whole-run ratio Ansible / rbe          = %.0fx"):format(a0 / rbe20))
else
  print("  ansible-playbook not installed: Ansible comparison skipped")
end
fs.remove(dir, { recursive = true })
