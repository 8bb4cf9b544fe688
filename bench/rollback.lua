-- bench/rollback.lua RBE [ROUNDS]: the time to roll the drill back from
-- its bad release 2.0.0 to 1.4.0, two ways, each on a fresh drill
-- (drill/up.lua; starting and stopping it is not timed):
--
--   rbe:  `rbe run playbooks/phase2.lua --yes` (defaults: Vercel promote
--         and git checkout + build + pm2 restart, down-migrations), journal
--         fsync'd, report written;
--   bash: the same runbook as a sequential bash script of its commands
--         (curl, jq, psql, pg_dump, redis-cli, git, npm, pm2), transcribed
--         with care: every wait is a poll with `sleep 1`, not a fixed
--         sleep; caches flushed with SCAN | xargs UNLINK, not key by key.
--         It checks what the playbook checks (health, version, mediaUrl,
--         work orders, queues, no new ERROR lines for 2 s, row counts).
--
-- Both must leave the same end state (checked after each run: Vercel
-- production, commit, health, schema, .env, flags, queues, rows, history).
-- Prints every round, the best of each, the ratio, and the phase timings:
-- rbe's from its journal, the script's from its own timestamps.
local rbe = require "rbe"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local json = require "rbe.json"
local pg = require "rbe.pg"
local http = require "rbe.http"

local RBE = arg[1] or error("usage: rbe bench/rollback.lua RBE [ROUNDS]")
local ROUNDS = tonumber(arg[2] or os.getenv("ROLLBACK_ROUNDS") or "3")
local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")
if here:sub(1, 1) ~= "/" then here = rbe.whoami().cwd .. "/" .. here end
local ROOT = here:gsub("/bench$", "")
local dir = fs.tmpdir("rbe-bench-rollback-")

local PHASES = { "1. notify", "2. application rollback", "3. database rollback",
  "4. environment restoration", "5. restart and smoke tests", "6. communication" }

---------------------------------------------------------------------------
-- the runbook as a bash script (phase markers on stderr: "PHASE n epoch")

local SCRIPT = [==[
#!/bin/bash
# The Phase 2 rollback runbook, command by command (vars: drill.env).
set -euo pipefail
phase() { echo "PHASE $1 $(date +%s.%N)" >&2; }
pm2() { PM2_HOME="$DRILL_PM2_HOME" "$DRILL_PM2" "$@"; }
q() { psql -X -v ON_ERROR_STOP=1 -Atq "$DRILL_PG_URL" -c "$1"; }
V() { local p=$1; shift; curl -sf -H "Authorization: Bearer $DRILL_VERCEL_TOKEN" "$@" "$DRILL_VERCEL_URL$p"; }
WORK=$1

phase 1
# note the starting point
curl -sf "$DRILL_APP_URL/health" > "$WORK/health-before.json" || true
for t in organizations users work_orders messages; do
  echo "$t $(q "select count(*) from $t")"
done > "$WORK/rows-before"
# (notify the team: no Slack webhook in the drill; status page: by hand)

phase 2
# Option A: Vercel, promote the last good production deployment
LAST_GOOD=$(V "/v6/deployments?projectId=$DRILL_PROJECT_ID&target=production&state=READY" \
  | jq -r '.deployments[1].uid')
V "/v10/projects/$DRILL_PROJECT/promote/$LAST_GOOD" -X POST > /dev/null
until [ "$(V "/v9/projects/$DRILL_PROJECT" | jq -r .lastAliasRequest.jobStatus)" = succeeded ]; do
  sleep 1
done
# Option B: git checkout, build, pm2 restart
cd "$DRILL_APP_DIR"
git checkout -q "$DRILL_APP_V1_TAG"
npm install --no-audit --no-fund > /dev/null 2>&1
npm run build > /dev/null
pm2 restart "$DRILL_APP_NAME" > /dev/null
SHA=$(git rev-parse HEAD)
until curl -sf "$DRILL_APP_URL/api/version" | jq -e --arg c "$SHA" '.commit == $c' > /dev/null; do
  sleep 1
done

phase 3
# stop traffic: pause the queues, wait until no job is active
curl -sf -X POST "$DRILL_APP_URL/api/queue/pause-all" > /dev/null
until [ "$(curl -sf "$DRILL_APP_URL/api/queue/stats" | jq '[.queues[].active] | add')" = 0 ]; do
  sleep 1
done
# back up the current state
pg_dump -Fc -f "$WORK/before-rollback.dump" "$DRILL_PG_URL"
# down-migrations, newest first, down to v1
CURRENT=$(q "select version from schema_migrations")
for f in $(ls "$DRILL_MIGRATIONS_DIR"/*.down.sql | sort -r); do
  v=$(basename "$f"); v=${v%%_*}
  if [ "$v" -gt "$DRILL_SCHEMA_V1" ] && [ "$v" -le "$CURRENT" ]; then
    q "update schema_migrations set dirty = true"
    psql -X -v ON_ERROR_STOP=1 -q "$DRILL_PG_URL" -f "$f"
    q "update schema_migrations set version = $v, dirty = false"
  fi
done
q "update schema_migrations set version = $DRILL_SCHEMA_V1, dirty = false"
[ "$(q "select version || ' ' || dirty from schema_migrations")" = "$DRILL_SCHEMA_V1 false" ]

phase 4
cp "$DRILL_ENV_BACKUP" "$DRILL_ENV_FILE"
q "update feature_flags set enabled = false, updated_at = now() where name = 'photo_first'"
q "update feature_flags set enabled = false, updated_at = now() where name = 'message_attachments'"

phase 5
for p in 'cache:work_order:*' 'cache:flags' 'gemini:caption:*'; do
  redis-cli -p "$DRILL_REDIS_PORT" --scan --pattern "$p" \
    | xargs -r -n 1000 redis-cli -p "$DRILL_REDIS_PORT" unlink > /dev/null
done
pm2 restart "$DRILL_APP_NAME" > /dev/null
SIZE=$(stat -c %s "$DRILL_APP_LOG")
# smoke tests (the app must answer before its resume endpoint can)
until curl -sf "$DRILL_APP_URL/health" \
    | jq -e '.status == "ok" and .database == "ok" and .redis == "ok"' > /dev/null; do
  sleep 1
done
curl -sf -X POST "$DRILL_APP_URL/api/queue/resume-all" > /dev/null
curl -sf "$DRILL_APP_URL/api/version" | jq -e --arg c "$SHA" '.commit == $c' > /dev/null
MSG=$(q "select id from messages where media_url is not null order by id desc limit 1")
curl -sf "$DRILL_APP_URL/api/messages/$MSG" | jq -e '.mediaUrl != null' > /dev/null
for id in 1 2 3 4; do curl -sf "$DRILL_APP_URL/api/work-orders/$id" > /dev/null; done
curl -sf "$DRILL_APP_URL/api/queue/stats" | jq -e '[.queues[].is_paused] | any | not' > /dev/null
# no new ERROR lines for 2 s
sleep 2
[ "$(tail -c +$((SIZE + 1)) "$DRILL_APP_LOG" | grep -c ' ERROR ' || true)" = 0 ]
# the rows are kept
for t in organizations users work_orders messages; do
  echo "$t $(q "select count(*) from $t")"
done | diff - "$WORK/rows-before"

phase 6
q "update deployment_history set status = 'rolled_back' where status = 'active'"
q "insert into deployment_history (version, git_sha, vercel_deployment_id, status, deployed_by, notes)
   select version, git_sha, vercel_deployment_id, 'rollback', '$(whoami)', 'bash runbook'
     from deployment_history where status = 'stable' order by deployed_at desc limit 1"
# (status page, stakeholders: by hand)
phase end
]==]

---------------------------------------------------------------------------

local function read_kv(path)
  local t = {}
  for line in fs.lines(path) do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then t[k] = v end
  end
  return t
end

local function drill_up(name)
  local state = dir .. "/" .. name
  local r = proc.run({ RBE, ROOT .. "/drill/up.lua", state }, { check = false, timeout = "180s" })
  if r.code ~= 0 then error("drill/up.lua failed:\n" .. r.stderr, 0) end
  return read_kv(state .. "/drill.env"), state
end

local function drill_down(state)
  proc.run({ RBE, ROOT .. "/drill/down.lua", state }, { check = false, timeout = "120s" })
end

local live = {}
local function cleanup()
  for s in pairs(live) do drill_down(s) end
  fs.remove(dir, { recursive = true, missing_ok = true })
end
local guard <close> = setmetatable({}, { __close = cleanup })

-- the same end state for both: returns nil or what differs
local function check_end(E, rows_before)
  local bad = {}
  local function want(what, ok) if not ok then bad[#bad + 1] = what end end
  local deadline = rbe.now() + 10
  local h
  repeat
    local ok, res = rbe.try(http.get, E.DRILL_APP_URL .. "/health", { timeout = "2s", raise = false })
    h = ok and res.status == 200 and res:json() or nil
    if h and h.status == "ok" then break end
    rbe.sleep(0.1)
  until rbe.now() > deadline
  want("health ok at v1", h and h.status == "ok" and h.version == "v1" and h.commit == E.DRILL_APP_V1_SHA)
  local p = http.get(E.DRILL_VERCEL_URL .. "/v9/projects/" .. E.DRILL_PROJECT,
    { auth = { bearer = rbe.secret(E.DRILL_VERCEL_TOKEN) } }):json()
  want("vercel production at v1", p.targets.production.id == E.DRILL_VERCEL_V1_DEPLOYMENT)
  local db <close> = pg.connect(rbe.secret(E.DRILL_PG_URL))
  local v = db:query("select version::text as v, dirty from schema_migrations")[1]
  want("schema at v1", v.v == E.DRILL_SCHEMA_V1 and not v.dirty)
  want("photo_first off", db:query("select enabled from feature_flags where name = 'photo_first'")[1].enabled == false)
  want(".env restored", fs.read(E.DRILL_ENV_FILE) == fs.read(E.DRILL_ENV_BACKUP))
  want("rollback recorded", db:query("select count(*) as n from deployment_history "
    .. "where status = 'rollback'")[1].n == 1)
  local rows = db:query("select (select count(*) from users) as users, (select count(*) from "
    .. "work_orders) as work_orders, (select count(*) from messages) as messages")[1]
  want("rows kept", rows.users == rows_before.users and rows.work_orders == rows_before.work_orders
    and rows.messages == rows_before.messages)
  local st = http.get(E.DRILL_APP_URL .. "/api/queue/stats"):json()
  for name, q in pairs(st.queues) do want("queue " .. name .. " running", q.is_paused == false) end
  return #bad > 0 and table.concat(bad, ", ") or nil
end

local function rows_of(E)
  local db <close> = pg.connect(rbe.secret(E.DRILL_PG_URL))
  return db:query("select (select count(*) from users) as users, (select count(*) from "
    .. "work_orders) as work_orders, (select count(*) from messages) as messages")[1]
end

local function run_rbe(round)
  local E, state = drill_up("rbe-" .. round)
  live[state] = true
  local rows = rows_of(E)
  local sd = dir .. "/rbe-state-" .. round
  local t0 = rbe.now()
  local r = proc.run({ RBE, "run", ROOT .. "/playbooks/phase2.lua", "--yes", "--state-dir", sd,
    "--reason", "bench" }, { env = E, check = false, timeout = "10m", cwd = ROOT })
  local wall = rbe.now() - t0
  if r.code ~= 0 then error("phase2.lua failed (exit " .. r.code .. "):\n" .. r.stderr, 0) end
  local bad = check_end(E, rows)
  local phases = {}
  local id = fs.list(sd .. "/runs")[1]
  for line in fs.lines(sd .. "/runs/" .. id .. "/journal.jsonl") do
    local ok, ev = pcall(json.decode, line)
    if ok and ev.ev == "phase_end" then phases[ev.phase] = ev.duration end
  end
  drill_down(state)
  live[state] = nil
  return wall, phases, bad
end

local function run_bash(round)
  local E, state = drill_up("bash-" .. round)
  live[state] = true
  local rows = rows_of(E)
  local work = dir .. "/bash-work-" .. round
  fs.mkdir(work)
  local path = dir .. "/phase2-runbook.sh"
  fs.write(path, SCRIPT, { mode = "0755" })
  local env = {}
  for k, v in pairs(E) do env[k] = v end
  env.PATH = E.DRILL_PG_BINDIR .. ":" .. os.getenv("PATH")
  local t0 = rbe.now()
  local r = proc.run({ "/bin/bash", path, work }, { env = env, check = false, timeout = "10m" })
  local wall = rbe.now() - t0
  if r.code ~= 0 then error("the bash runbook failed (exit " .. r.code .. "):\n" .. r.stderr, 0) end
  local bad = check_end(E, rows)
  local marks = {}
  for n, t in r.stderr:gmatch("PHASE (%w+) ([%d.]+)") do marks[#marks + 1] = { n = n, t = tonumber(t) } end
  local phases = {}
  for i = 1, #marks - 1 do
    local k = tonumber(marks[i].n)
    if k then phases[PHASES[k]] = marks[i + 1].t - marks[i].t end
  end
  drill_down(state)
  live[state] = nil
  return wall, phases, bad
end

---------------------------------------------------------------------------

for _, tool in ipairs { "curl", "jq", "psql", "redis-cli", "git", "npm" } do
  local ok = rbe.try(proc.run, { "sh", "-c", "command -v " .. tool }, { stdout = "null" })
  if not ok then
    print("rollback: " .. tool .. " is not installed: the bash baseline cannot run; skipped")
    return
  end
end

print(("rollback: drill 2.0.0 -> 1.4.0, phase2.lua vs the runbook as a sequential bash "
  .. "script, %d round(s), a fresh drill for each run"):format(ROUNDS))
local best = {}
for round = 1, ROUNDS do
  local tr, pr, badr = run_rbe(round)
  local tb, pbash, badb = run_bash(round)
  print(("  round %d: rbe %6.2f s   bash %6.2f s   (%.2fx)%s%s"):format(round, tr, tb, tb / tr,
    badr and ("  rbe end state WRONG: " .. badr) or "", badb and ("  bash end state WRONG: " .. badb) or ""))
  if not best.rbe or tr < best.rbe then best.rbe, best.rbe_phases = tr, pr end
  if not best.bash or tb < best.bash then best.bash, best.bash_phases = tb, pbash end
end
print(("  best:    rbe %6.2f s   bash %6.2f s   rbe is %.2fx faster than the sequential script "
  .. "(goal >= 2x)"):format(best.rbe, best.bash, best.bash / best.rbe))
print(("  %-30s %7s %9s %9s"):format("phase (best runs)", "budget", "rbe", "bash"))
local budgets = { "1m", "5m", "10m", "2m", "3m", "1m" }
for i, name in ipairs(PHASES) do
  print(("  %-30s %7s %8.2fs %8.2fs"):format(name, budgets[i], best.rbe_phases[name] or 0,
    best.bash_phases[name] or 0))
end
