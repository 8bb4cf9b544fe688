#!/bin/sh
# bench/bench_redis.sh RBE BINDIR: rbe.redis benchmarks (bench/redis.lua)
# on a redis-server of their own, started here with the test fixture's
# script and stopped on exit, so a shared server is never touched.
# Sizes: REDIS_BENCH_KEYS, REDIS_BENCH_MATCH, REDIS_BENCH_OPS and
# REDIS_BENCH_REPEAT (see redis.lua); the defaults take about 1.5 minutes.
set -e
RBE=$(readlink -f "${1:-build/bin/rbe}")
BIN=${2:-$(dirname "$RBE")}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
if [ ! -x "$BIN/rbe-redis-floor" ]; then
  cmake --build "$(dirname "$BIN")" --target rbe-redis-floor >/dev/null
fi
for tool in redis-server redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null 2>&1 || { echo "bench_redis: $tool not found (make deps)" >&2; exit 1; }
done
DIR=$(mktemp -d /tmp/rbe-bench-redis.XXXXXX)
LOG=$(mktemp /tmp/rbe-bench-redis-log.XXXXXX)
trap '"$ROOT/tests/fixtures/servers.sh" stop "$DIR" >/dev/null 2>&1; rm -f "$LOG"' EXIT
trap 'exit 130' INT TERM
if ! "$ROOT/tests/fixtures/servers.sh" start "$DIR" redis 2>"$LOG"; then
  cat "$LOG" >&2
  exit 1
fi
PORT=$(sed -n 's/^RBE_TEST_REDIS_PORT=//p' "$DIR/env")
"$RBE" "$HERE/redis.lua" "$PORT" "$BIN"
