#!/bin/sh
# bench/bench_pg.sh RBE BINDIR: rbe.pg on one connection to a PostgreSQL of
# its own (the test fixture's script starts it, scram-sha-256 over TCP to
# 127.0.0.1; stopped on exit).  PG_BENCH_N SELECT 1, sequential and
# pipelined, each against the C floor (bench/pg_floor.c: blocking libpq
# used the same way), and the runbook way, one `psql -c` process per
# statement (PG_BENCH_PSQL of them), as rates and ratios.  Figures only:
# nothing passes or fails on timings.
set -e
RBE=$(readlink -f "${1:-build/bin/rbe}")
BIN=${2:-$(dirname "$RBE")}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
N=${PG_BENCH_N:-10000}
NPSQL=${PG_BENCH_PSQL:-100}
ROUNDS=${PG_BENCH_ROUNDS:-3}
if [ ! -x "$BIN/rbe-pg-floor" ]; then
  cmake --build "$(dirname "$BIN")" --target rbe-pg-floor >/dev/null
fi
command -v psql >/dev/null 2>&1 || { echo "bench_pg: psql not found (make deps)" >&2; exit 1; }
DIR=$(mktemp -d /tmp/rbe-bench-pg.XXXXXX)
rmdir "$DIR"   # servers.sh creates (and later deletes) it
trap '"$ROOT/tests/fixtures/servers.sh" stop "$DIR" >/dev/null 2>&1' EXIT INT TERM
"$ROOT/tests/fixtures/servers.sh" start "$DIR" pg 2>/dev/null
URL=$(sed -n 's/^RBE_TEST_PG_URL=//p' "$DIR/env")

# best of ROUNDS for each contender, runs interleaved so drift hits all
best() { awk 'NR == 1 || $1 < m { m = $1 } END { printf "%.6f", m }'; }
: >"$DIR/floor_seq"; : >"$DIR/floor_pipe"; : >"$DIR/rbe_seq"; : >"$DIR/rbe_pipe"
i=0
while [ "$i" -lt "$ROUNDS" ]; do
  "$BIN/rbe-pg-floor" "$URL" "$N" seq >>"$DIR/floor_seq"
  "$BIN/rbe-pg-floor" "$URL" "$N" pipe >>"$DIR/floor_pipe"
  "$RBE" "$HERE/pg.lua" "$URL" "$N" >"$DIR/rbe_out"
  sed -n 's/^seq //p' "$DIR/rbe_out" >>"$DIR/rbe_seq"
  sed -n 's/^pipe //p' "$DIR/rbe_out" >>"$DIR/rbe_pipe"
  i=$((i + 1))
done
FS=$(best <"$DIR/floor_seq"); FP=$(best <"$DIR/floor_pipe")
RS=$(best <"$DIR/rbe_seq"); RP=$(best <"$DIR/rbe_pipe")

# the runbook way: a psql process (connect, SCRAM, query, exit) per statement
T0=$(date +%s.%N)
i=0
while [ "$i" -lt "$NPSQL" ]; do
  psql -X -q -At "$URL" -c "SELECT 1" >/dev/null
  i=$((i + 1))
done
T1=$(date +%s.%N)

awk -v n="$N" -v fs="$FS" -v fp="$FP" -v rs="$RS" -v rp="$RP" \
    -v np="$NPSQL" -v t0="$T0" -v t1="$T1" -v rounds="$ROUNDS" 'BEGIN {
  ps = (t1 - t0) / np
  printf "rbe.pg, one connection, %d x SELECT 1 (best of %d):\n", n, rounds
  printf "  sequential  rbe %8.0f /s  C floor %8.0f /s  (%.1f / %.1f us each)\n", n / rs, n / fs, rs / n * 1e6, fs / n * 1e6
  printf "  pipelined   rbe %8.0f /s  C floor %8.0f /s  (%.1f / %.1f us each)\n", n / rp, n / fp, rp / n * 1e6, fp / n * 1e6
  printf "  psql -c per statement %6.1f /s  (%.1f ms each, %d runs)\n", 1 / ps, ps * 1000, np
  printf "  ratio sequential rbe / C floor = %.2fx (goal >= 0.8x)\n", fs / rs
  printf "  ratio pipelined rbe / C floor  = %.2fx (goal >= 0.7x)\n", fp / rp
  printf "  ratio sequential rbe / psql -c = %.0fx (goal >= 100x)\n", ps / (rs / n)
}'
