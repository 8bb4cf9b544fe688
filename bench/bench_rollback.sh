#!/bin/sh
# bench/bench_rollback.sh RBE BINDIR: the time to roll the drill (drill/)
# back from 2.0.0 to 1.4.0 with playbooks/phase2.lua vs the same runbook as
# a sequential bash script of its commands (bench/rollback.lua).
# ROLLBACK_ROUNDS (default 3) rounds, a fresh drill for each run.
set -e
RBE=$(readlink -f "$1")
HERE=$(cd "$(dirname "$0")" && pwd)
# the bash baseline's tools; the drill's npm packages (a no-op when there)
for tool in curl jq; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$tool" >/dev/null
  fi
done
"$HERE/../tests/fixtures/npm-install.sh" >/dev/null
"$RBE" "$HERE/rollback.lua" "$RBE" "${ROLLBACK_ROUNDS:-3}"
