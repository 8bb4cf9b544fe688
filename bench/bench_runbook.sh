#!/bin/sh
# bench/bench_runbook.sh RBE BINDIR: a 20-step runbook as a bash script of
# curl/psql/redis-cli calls vs the same steps as an rbe playbook.
set -e
RBE=$(readlink -f "$1")
if ! command -v curl >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends curl >/dev/null
fi
"$RBE" "$(dirname "$0")/runbook.lua" "$RBE"
