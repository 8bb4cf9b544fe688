#!/bin/bash
# tests/cli.sh RBE: the command line as users meet it: help, exit codes,
# error messages with file:line, signals, os.exit, library lookup and the
# installed layout.  Prints one line per check; exits 1 if any failed.
set -u
RBE=$(readlink -f "$1")
BUILD=$(dirname "$(dirname "$RBE")")
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fails=0
ok()   { echo "ok   $1"; }
bad()  { echo "FAIL $1"; fails=$((fails + 1)); }
# expect NAME WANT_CODE CMD...: run, capture stdout+stderr in $T/out
expect() {
  local name=$1 want=$2; shift 2
  "$@" >"$T/out" 2>&1
  local got=$?
  if [ "$got" = "$want" ]; then ok "$name (exit $got)"
  else bad "$name: exit $got, want $want"; sed 's/^/     | /' "$T/out"; fi
}
contains() {
  if grep -qF -- "$2" "$T/out"; then ok "$1"
  else bad "$1: output lacks '$2'"; sed 's/^/     | /' "$T/out"; fi
}

expect "--help" 0 "$RBE" --help
contains "--help lists run" "run FILE"
contains "--help lists exit codes" "130 interrupted"
expect "no arguments is a usage error" 2 "$RBE"
expect "unknown option is a usage error" 2 "$RBE" --bogus
contains "unknown option named" "--bogus"
expect "help run" 0 "$RBE" help run
expect "help for an unknown command" 2 "$RBE" help nosuch
expect "version" 0 "$RBE" version
contains "version names Lua" "Lua 5.4"
contains "version names libuv" "libuv"

printf 'local x = 1\nerror("boom")\n' > "$T/err.lua"
expect "runtime error exits 1" 1 "$RBE" "$T/err.lua"
contains "runtime error has file:line" "err.lua:2: boom"
contains "runtime error has a traceback" "stack traceback"

printf 'local x = = 1\n' > "$T/syntax.lua"
expect "syntax error in a script exits 1" 1 "$RBE" "$T/syntax.lua"
contains "syntax error has file:line" "syntax.lua:1:"
expect "syntax error in a playbook (run) exits 2" 2 "$RBE" run "$T/syntax.lua"
expect "missing file" 1 "$RBE" "$T/nope.lua"
contains "missing file named" "nope.lua"

printf 'print(arg[0], arg[1], arg[2], select("#", ...))\n' > "$T/args.lua"
expect "arguments reach the script" 0 "$RBE" "$T/args.lua" a b
contains "arg table like lua(1)" "args.lua	a	b	2"

cat > "$T/exit.lua" <<'LUA'
local c <close> = setmetatable({}, { __close = function() print("closed on exit") end })
rbe.spawn(function() rbe.sleep(30) end)
rbe.sleep(0.01)
os.exit(3)
LUA
expect "os.exit inside a task sets the exit code" 3 "$RBE" "$T/exit.lua"
contains "os.exit unwinds to-be-closed variables" "closed on exit"

cat > "$T/gc.lua" <<'LUA'
_G.keep = setmetatable({}, { __gc = function()
  local ok, err = pcall(rbe.sleep, 0)
  io.stderr:write("outside: ", tostring(err), "\n")
end })
LUA
expect "script with a finalizer" 0 "$RBE" "$T/gc.lua"
contains "waiting outside a task is a readable error" "rbe.sleep must run inside a task"

cat > "$T/deadlock.lua" <<'LUA'
local a, b
a = rbe.spawn(function() rbe.sleep(0.01); return b:join() end)
b = rbe.spawn(function() rbe.sleep(0.01); return a:join() end)
a:join()
LUA
expect "deadlock is detected, not a hang" 1 timeout 10 "$RBE" "$T/deadlock.lua"
contains "deadlock is reported" "deadlock"

# Ctrl-C: the main task is cancelled, its to-be-closed variables run, 130.
cat > "$T/sleep.lua" <<'LUA'
local c <close> = setmetatable({}, { __close = function() print("cleanup ran") end })
io.stdout:write("ready\n"); io.stdout:flush()
rbe.sleep(30)
LUA
sigtest() { # NAME SIGNAL SCRIPT WANT
  local start=$SECONDS
  rm -f "$T/out"   # else the previous test's "ready" is seen before the shell truncates it
  "$RBE" "$3" >"$T/out" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do grep -q ready "$T/out" && break; sleep 0.05; done
  kill -"$2" $pid
  wait $pid
  local got=$?
  if [ "$got" = "$4" ] && [ $((SECONDS - start)) -lt 10 ]; then ok "$1 (exit $got)"
  else bad "$1: exit $got want $4"; sed 's/^/     | /' "$T/out"; fi
}
sigtest "SIGINT during a sleep exits 130" INT "$T/sleep.lua" 130
contains "SIGINT runs to-be-closed variables" "cleanup ran"
sigtest "SIGTERM during a sleep exits 130" TERM "$T/sleep.lua" 130
contains "SIGTERM runs to-be-closed variables" "cleanup ran"

printf 'io.stdout:write("ready\\n"); io.stdout:flush()\nwhile true do end\n' > "$T/busy.lua"
sigtest "SIGINT stops a busy loop" INT "$T/busy.lua" 130

cat > "$T/stubborn.lua" <<'LUA'
pcall(rbe.sleep, 30)
io.stdout:write("caught\n"); io.stdout:flush()
while true do end
LUA
rm -f "$T/out"
"$RBE" "$T/stubborn.lua" >"$T/out" 2>&1 &
pid=$!
sleep 0.3; kill -INT $pid
for _ in $(seq 100); do grep -q caught "$T/out" && break; sleep 0.05; done
kill -INT $pid; wait $pid; got=$?
if [ "$got" = 130 ] && grep -q caught "$T/out"; then ok "second Ctrl-C exits at once"
else bad "second Ctrl-C: exit $got"; cat "$T/out"; fi

# Lua library lookup: LUA_PATH is ignored unless asked; RBE_PATH overrides.
mkdir -p "$T/lp"
echo 'return "from LUA_PATH"' > "$T/lp/elsewhere.lua"
echo 'print(pcall(require, "elsewhere"))' > "$T/req.lua"
expect "LUA_PATH ignored" 0 env LUA_PATH="$T/lp/?.lua" "$RBE" "$T/req.lua"
contains "LUA_PATH module not found" "false"
expect "RBE_USE_LUA_PATH=1 honours LUA_PATH" 0 env RBE_USE_LUA_PATH=1 LUA_PATH="$T/lp/?.lua;;" "$RBE" "$T/req.lua"
contains "LUA_PATH module found" "from LUA_PATH"
expect "RBE_PATH pointing nowhere" 2 env RBE_PATH="$T/empty" "$RBE" version
contains "RBE_PATH failure explained" "cannot load rbe's Lua library"

# The installed layout: bin/rbe finds share/rbe/lua.
if cmake --install "$BUILD" --prefix "$T/prefix" >/dev/null 2>&1; then
  cp "$T/sleep.lua" "$T/x.lua"
  echo 'print(require("rbe").now() > 0)' > "$T/inst.lua"
  expect "installed rbe runs a script" 0 "$T/prefix/bin/rbe" "$T/inst.lua"
  contains "installed rbe loads its library" "true"
else bad "cmake --install failed"; fi

echo "$fails failed"
[ "$fails" = 0 ]
