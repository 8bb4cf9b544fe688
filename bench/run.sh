#!/bin/sh
# bench/run.sh RBE: every benchmark; prints figures and ratios, never
# passes or fails on timings.
set -e
RBE=$(readlink -f "${1:-build/bin/rbe}")
BIN=$(dirname "$RBE")
HERE=$(dirname "$0")
cmake --build "$(dirname "$BIN")" --target rbe-floor >/dev/null
echo "== startup"; "$RBE" "$HERE/startup.lua" "$RBE" "$BIN/rbe-floor" "${STARTUP_RUNS:-200}"
echo "== spawn";   "$RBE" "$HERE/spawn.lua" "${SPAWN_N:-1000}"
echo "== tasks";   "$RBE" "$HERE/tasks.lua" "${TASKS_N:-10000}"
