#!/bin/sh
# bench/bench_cache.sh RBE BINDIR: modules/cache.lua's flush (bench/cache.lua)
# against the runbook's `redis-cli KEYS | xargs redis-cli DEL`, on a
# redis-server of its own, started here with the test fixture's script and
# stopped on exit, so a shared server is never touched.  It borrows
# rbe-redis-floor (bench/redis_floor.c) to fill the keyspace and to PING
# from a second process.  Sizes: CACHE_BENCH_KEYS (2000000),
# CACHE_BENCH_MATCH (1000000), CACHE_BENCH_REPEAT (3); CACHE_BENCH_BACKUP=1 also
# times a flush with backup and its restore.  About a minute with the defaults.
set -e
RBE=$(readlink -f "${1:-build/bin/rbe}")
BIN=${2:-$(dirname "$RBE")}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
if [ ! -x "$BIN/rbe-redis-floor" ]; then
  cmake --build "$(dirname "$BIN")" --target rbe-redis-floor >/dev/null
fi
for tool in redis-server redis-cli xargs; do
  command -v "$tool" >/dev/null 2>&1 || { echo "bench_cache: $tool not found (make deps)" >&2; exit 1; }
done
DIR=$(mktemp -d /tmp/rbe-bench-cache.XXXXXX)
LOG=$(mktemp /tmp/rbe-bench-cache-log.XXXXXX)
trap '"$ROOT/tests/fixtures/servers.sh" stop "$DIR" >/dev/null 2>&1; rm -f "$LOG"' EXIT
trap 'exit 130' INT TERM
if ! "$ROOT/tests/fixtures/servers.sh" start "$DIR" redis 2>"$LOG"; then
  cat "$LOG" >&2
  exit 1
fi
PORT=$(sed -n 's/^RBE_TEST_REDIS_PORT=//p' "$DIR/env")
"$RBE" "$HERE/cache.lua" "$PORT" "$BIN"
