#!/bin/sh
# bench/bench_deploy.sh RBE BINDIR: the deploy-side modules (health's log
# error rate vs awk/grep, notify's fan-out vs curl, vercel's promote
# polling) -- see bench/deploy.lua.  Needs node (the local recorder and
# the fake Vercel API); curl only for the notify baseline.
set -e
RBE=$(readlink -f "${1:-build/bin/rbe}")
command -v node >/dev/null 2>&1 || { echo "bench_deploy: node not found (make deps)" >&2; exit 1; }
"$RBE" "$(dirname "$0")/deploy.lua"
