-- rbe.help: the help texts of the playbook commands (`rbe help run`, ...).
local M = {
  run = [[
usage: rbe run FILE [options]

Runs the playbook FILE: steps in order, undo of completed steps in reverse
order when one fails, a journal per run and a report at the end.
(A FILE that does not return a playbook runs as a plain Lua script.)

options:
  --var NAME=VALUE     set a declared var (repeatable)
  --var-file FILE      NAME=VALUE lines ('#' comments)
  -y, --yes            confirm manual steps and confirmations (journaled)
  --reason TEXT        why this run happens (journal and report)
  --as NAME            who runs it (default: the login name)
  --json               one JSON event per line on stdout
  -q, --quiet          only failures and the summary
  -v, --verbose        also every gate check
  --state-dir DIR      journals and locks (default $RBE_STATE_DIR or ./.rbe)
  --no-color           no colours (NO_COLOR is honoured too)

exit codes: 0 done, 1 a step failed (undo ran), 2 usage or playbook error,
3 an undo failed (a person must act), 75 another run holds the lock,
130 interrupted (resumable with `rbe resume RUN_ID`).
]],
  plan = [[
usage: rbe plan FILE [--var NAME=VALUE] [--var-file FILE] [--json]

Prints the playbook's tree (phases, steps, parallel groups, gates, manual
steps, whether each step has an undo, budgets, vars) and each step's
plan(ctx) output: what it would change.  Writes nothing of its own.
]],
  resume = [[
usage: rbe resume RUN_ID [options]

Continues a crashed or interrupted run: steps journaled as done are not
run again.  A step that was in flight runs again only if it is idempotent
or its check says it is not done (or its pg_tx marker is missing);
otherwise you are asked, or pass --rerun-unknown / --skip-unknown.
Refuses if the playbook changed since the run started, unless --force.

options: --force --rerun-unknown --skip-unknown --yes --var --var-file
         --json -q -v --state-dir DIR --no-color --as NAME
]],
  history = "usage: rbe history [--state-dir DIR] [--json]\nLists runs: id, playbook, user, start, duration, status.\n",
  show = "usage: rbe show RUN_ID [--state-dir DIR]\nPrints a run's report and a summary of its journal.\n",
  ["exit-codes"] = [[
rbe exit codes:
  0    done
  1    a step failed; the undo of completed steps ran
  2    usage error or playbook error (nothing ran)
  3    an undo failed: a person must act (see the report)
  75   another run of this playbook holds the lock
  130  interrupted (Ctrl-C / SIGTERM); `rbe resume RUN_ID` continues
]],
}

return M
