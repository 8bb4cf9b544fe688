#!/bin/sh
# bench/run.sh RBE: every benchmark; prints figures and ratios, never
# passes or fails on timings.  Core benchmarks first, then every
# bench/bench_*.sh (one per primitive: pg, http, redis, ...), each called
# with the rbe binary and the directory of the floor programs.
set -e
RBE=$(readlink -f "${1:-build/bin/rbe}")
BIN=$(dirname "$RBE")
HERE=$(cd "$(dirname "$0")" && pwd)
cmake --build "$(dirname "$BIN")" --target floors >/dev/null
echo "== startup"; "$RBE" "$HERE/startup.lua" "$RBE" "$BIN/rbe-floor" "${STARTUP_RUNS:-200}"
echo "== spawn";   "$RBE" "$HERE/spawn.lua" "${SPAWN_N:-1000}"
echo "== tasks";   "$RBE" "$HERE/tasks.lua" "${TASKS_N:-10000}"
for b in "$HERE"/bench_*.sh; do
  [ -e "$b" ] || continue
  name=$(basename "$b" .sh); echo "== ${name#bench_}"
  "$b" "$RBE" "$BIN"
done
