#!/bin/sh
# bench/bench_repl.sh RBE BINDIR: the console's start-up, its per-line cost
# in a piped session against lua5.4 and a task-per-line floor, and the
# pretty printer against a string.format loop (bench/repl.lua).  Prints
# figures, never passes or fails on them.
set -eu
RBE=${1:-build/bin/rbe}
HERE=$(cd "$(dirname "$0")" && pwd)
"$RBE" "$HERE/repl.lua" "$RBE"
