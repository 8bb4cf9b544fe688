-- scripts/compile-lib.lua SRC OUT: compile every .lua file under SRC (the
-- engine's Lua library) to bytecode under OUT (same relative paths, suffix
-- .luac), keeping debug info so tracebacks still name the source lines.
-- Run at build time by the rbe binary itself, so the bytecode matches its
-- Lua exactly; rbe prefers a .luac only while it is newer than its source.
local src, out = arg[1], arg[2]
local proc = require "rbe.proc"
local fs = require "rbe.fs"

local files = proc.run({ "find", src, "-name", "*.lua", "-type", "f" }).stdout
local n = 0
for path in files:gmatch("[^\n]+") do
  local rel = path:sub(#src + 2)
  local dest = out .. "/" .. rel:gsub("%.lua$", ".luac")
  local chunk = assert(loadfile(path))
  fs.mkdir(dest:match("^(.*)/[^/]*$"))
  fs.write(dest, string.dump(chunk))
  n = n + 1
end
print(("compiled %d Lua files to %s"):format(n, out))
