-- rbe.report: the end of a run.  summary() prints the recap table and the
-- one-line result; write() fills in <run dir>/report.md like the runbooks'
-- "Rollback Execution Log": date, executed by, reason, budget vs actual per
-- phase, actions taken as a checklist, verification results, errors, and
-- what remains to do by hand.
local fs = require "rbe.fs"
local progress = require "rbe.progress"

local M = {}
local fmt_dur = progress.fmt_dur

local function rows(run)
  local out = {}
  for _, node in ipairs(run.book.order) do
    local name = node.name
    out[#out + 1] = {
      name = name, kind = node.kind,
      status = run.status[name] or "not run",
      attempts = run.attempts[name] or 0,
      duration = run.durations[name],
      reason = run.reasons[name],
      error = run.errors[name],
    }
  end
  return out
end
M.rows = rows

function M.summary(run, out)
  local r = rows(run)
  local w = 4
  for _, x in ipairs(r) do w = math.max(w, #x.name) end
  w = math.min(w, 48)
  out:write("\n", ("%-" .. w .. "s  %-11s %8s  %9s\n"):format("step", "status", "attempts", "duration"))
  out:write(("-"):rep(w + 33), "\n")
  for _, x in ipairs(r) do
    out:write(("%-" .. w .. "s  %-11s %8s  %9s\n"):format(x.name:sub(1, w), x.status,
      x.attempts > 0 and tostring(x.attempts) or "-", x.duration and fmt_dur(x.duration) or "-"))
  end
  out:write(("\nrbe: %s in %s (run %s, exit %d)%s\n"):format(run.status_text,
    fmt_dur(run.duration or 0), run.run_id, run.exit_code,
    run.run_dir and ("\n     report: " .. run.run_dir .. "/report.md") or ""))
  if run.undo_failed then
    out:write(("rbe: UNDO FAILED for '%s': %s\n     a person must act: see the report\n")
      :format(run.undo_failed.step, run.undo_failed.error))
  end
  if run.exit_code == 130 then
    out:write(("rbe: resume with: rbe resume %s\n"):format(run.run_id))
  end
  out:flush()
end

local CHECK = { ok = "x", skipped = "x", undone = "x" }

function M.render(run)
  local b = {}
  local function add(...) b[#b + 1] = table.concat({ ... }) end
  local book = run.book
  add("# Rollback Execution Log: ", book.name, "\n")
  add("| | |")
  add("|---|---|")
  add("| Run | `", run.run_id, "` |")
  add("| Date | ", run.started_at or "?", " |")
  add("| Executed by | ", run.user, " on ", run.who.host, " (pid ", tostring(run.who.pid), ")",
      run.user ~= run.who.user and (", login " .. run.who.user) or "", " |")
  add("| Reason | ", run.mask(run.opts.reason or "(none given)"), " |")
  add("| Playbook | `", book.path, "` (sha256 `", book.sha256:sub(1, 16), "...`) |")
  add("| Result | **", run.status_text or "?", "** (exit ", tostring(run.exit_code), ") |")
  add("| Budget | ", run.budget and fmt_dur(run.budget) or "none", ", used ",
      fmt_dur(run.duration or 0), " |")
  add("")
  M.render_trigger(run, add)
  if #run.phases > 0 then
    add("## Phases", "\n")
    add("| phase | budget | actual |")
    add("|---|---|---|")
    for _, p in ipairs(run.phases) do
      add("| ", p.name, " | ", p.budget and fmt_dur(p.budget) or "-", " | ",
          p.duration and fmt_dur(p.duration) or "-",
          (p.budget and p.duration and p.duration > p.budget) and " (over)" or "", " |")
    end
    add("")
  end
  add("## Actions taken", "\n")
  for _, x in ipairs(rows(run)) do
    local mark = CHECK[x.status] and "x" or " "
    local detail = x.status
    if x.duration then detail = detail .. ", " .. fmt_dur(x.duration) end
    if x.attempts > 1 then detail = detail .. ", " .. x.attempts .. " attempts" end
    if x.reason then detail = detail .. ", " .. x.reason end
    add("- [", mark, "] ", x.name, " (", x.kind, "): ", detail)
  end
  add("")
  if next(run.gates) then
    add("## Verification", "\n")
    for _, node in ipairs(book.order) do
      local g = run.gates[node.name]
      if g then
        add("- ", node.name, ": ", g.passed and "passed" or "FAILED", ", ", tostring(g.streak), "/",
            tostring(g.need), " in a row after ", tostring(g.polls), " checks (",
            fmt_dur(g.duration), ")", g.error and (": " .. run.mask(g.error)) or "")
      end
    end
    add("")
  end
  if #run.manual_log > 0 then
    add("## Operator confirmations", "\n")
    for _, m in ipairs(run.manual_log) do
      add("- ", m.step, ": confirmed by ", m.by, " at ", m.at, m.auto and " (--yes)" or "")
    end
    add("")
  end
  local errs = {}
  for _, x in ipairs(rows(run)) do
    if x.error then errs[#errs + 1] = "- " .. x.name .. ": " .. run.mask(x.error):gsub("\n", " ") end
  end
  for _, u in ipairs(run.undo_log) do
    if not u.ok then errs[#errs + 1] = "- undo of " .. u.step .. ": " .. u.error:gsub("\n", " ") end
  end
  for _, w in ipairs(run.warnings) do errs[#errs + 1] = "- warning: " .. run.mask(w) end
  if #errs > 0 then
    add("## Errors", "\n")
    for _, e in ipairs(errs) do add(e) end
    add("")
  end
  add("## Remaining by hand", "\n")
  local by_hand = {}
  if run.undo_failed then
    by_hand[#by_hand + 1] = ("- Undo of **%s** failed (%s): finish it by hand."):format(
      run.undo_failed.step, run.undo_failed.error)
    for _, x in ipairs(rows(run)) do
      if x.status == "ok" then
        by_hand[#by_hand + 1] = "- Still done, not undone: " .. x.name
      end
    end
  end
  if run.exit_code == 1 and not run.undo_failed then
    for _, x in ipairs(rows(run)) do
      if x.status == "ok" and x.kind ~= "gate" then
        by_hand[#by_hand + 1] = "- Still in effect (it has no undo): " .. x.name
      end
    end
  end
  if run.exit_code == 130 then
    by_hand[#by_hand + 1] = "- The run was interrupted: `rbe resume " .. run.run_id .. "` continues it."
  end
  for _, name in ipairs(run.tolerated) do
    by_hand[#by_hand + 1] = "- Step " .. name .. " failed and was tolerated (on_failure = continue): check it."
  end
  for _, x in ipairs(rows(run)) do
    if x.status == "not run" and run.exit_code ~= 0 then
      by_hand[#by_hand + 1] = "- Not run: " .. x.name
    end
  end
  if #by_hand == 0 then by_hand[1] = "- Nothing." end
  for _, t in ipairs(by_hand) do add(t) end
  add("")
  return table.concat(b, "\n")
end

-- What fired the run (`rbe watch`): the trigger's evidence, masked.  Kept
-- apart from render() (see the hooks at the end of rbe.runner).
function M.render_trigger(run, add)
  local t = run.trigger
  if t == nil then return end
  local journal = require "rbe.journal"
  t = journal.sanitize(t, run.mask)
  add("## Trigger", "\n")
  if type(t) ~= "table" then
    add("- ", (tostring(t):gsub("\n", " ")))
    add("")
    return
  end
  if t.fired_at then add("- Fired at ", tostring(t.fired_at)) end
  if t.description then add("- Trigger: ", tostring(t.description)) end
  if t.reason then add("- Evidence: ", (tostring(t.reason):gsub("\n", " "))) end
  local checks = type(t.checks) == "table" and t.checks or {}
  for i, c in ipairs(checks) do
    local text = type(c) == "table" and (c.reason or c.evidence or c.at) or c
    if type(text) == "table" then
      local ok, s = pcall(require("cjson").encode, text)
      text = ok and s or "?"
    end
    add("- Check ", tostring(i), (type(c) == "table" and c.at) and (" at " .. tostring(c.at)) or "",
        ": ", (tostring(text):gsub("\n", " ")))
  end
  if not t.reason and #checks == 0 then
    local ok, s = pcall(require("cjson").encode, t)
    add("- ", ok and s or "?")
  end
  add("")
end

function M.write(run)
  if not run.run_dir then return end
  fs.write(run.run_dir .. "/report.md", M.render(run), { mode = "0600" })
end

return M
