-- notify: tell people what a rollback is doing.  Senders for Slack
-- incoming webhooks, PagerDuty's Events API v2 (alerts and change events)
-- and a generic JSON webhook; the runbooks' three messages (started,
-- progress, done/failed) as templates filled from a run; a pb.step builder
-- and the playbook's `notify` field (notify.on_run), where a failing
-- notification is journaled and never fails the rollback unless
-- `required = true`.  Webhook URLs and routing keys are secrets from the
-- start: they never appear in errors, logs, the journal or the report.
--
--   notify.slack{webhook, text, blocks}                     -> info  [yields]
--   notify.pagerduty{routing_key, action, dedup_key, summary, ...} -> info
--   notify.pagerduty_change{routing_key, summary, ...}      -> info  [yields]
--   notify.webhook{url, json}                               -> info  [yields]
--   notify.message(kind, info) -> {kind, text, summary, blocks, fields}
--   notify.send(targets, msg, {required, log}) -> results   [yields]
--   notify.step{targets..., message, required} -> a pb.step spec
--   notify.on_run{targets..., on, required}   -> function for pb.playbook's notify
--
-- See docs/modules/notify.md.
local rbe = require "rbe"
local kit = require "rbe.stepkit"
local http = require "rbe.http"
local json = require "rbe.json"

local type, pairs, ipairs, error, tostring, pcall, setmetatable =
  type, pairs, ipairs, error, tostring, pcall, setmetatable
local format, concat = string.format, table.concat

local M = {}

M.PAGERDUTY_URL = "https://events.pagerduty.com"
M.KINDS = { "started", "progress", "done", "failed" }

local SEVERITIES = { critical = true, error = true, warning = true, info = true }
local ACTIONS = { trigger = true, acknowledge = true, resolve = true }

---------------------------------------------------------------------------
-- helpers

local function check_fields(t, known, fname)
  for k in pairs(t) do
    if not known[k] then
      error(format("%s: unknown option '%s'", fname, tostring(k)), 3)
    end
  end
end

local function as_secret(v, what, fname)
  if rbe.is_secret(v) then return v end
  if type(v) ~= "string" or v == "" then
    error(format("%s: %s expected, got %s", fname, what, type(v)), 3)
  end
  return rbe.secret(v)
end

local function scrub(s, secrets)
  s = tostring(s)
  for _, x in ipairs(secrets) do
    x = rbe.reveal(x)
    if type(x) == "string" and #x >= 3 then
      local a, b = s:find(x, 1, true)
      while a do
        s = s:sub(1, a - 1) .. "***" .. s:sub(b + 1)
        a, b = s:find(x, a + 3, true)
      end
    end
  end
  return s
end

-- Errors that belong to the task (cancel, Ctrl-C, an enclosing
-- rbe.timeout) travel on unchanged.
local function task_error(err)
  return rbe.is_error(err) and (err.kind == "cancelled"
    or (err.kind == "timeout" and err.code == "ETIMEDOUT"))
end

-- Send `body` as JSON to `url` (a secret); returns the response or raises
-- a `notify` error naming the target (never the URL or the key).  Every
-- method is retried on connection failures, 429 and 5xx: a message that
-- arrives twice is better than one that never does.  The retries are
-- done here, not by rbe.http, whose retry log line would print the URL
-- (a Slack webhook's secret is in its path).
local function post(target, url, body, o, secrets)
  local retries = o.retries or 2
  local attempt = 0
  while true do
    attempt = attempt + 1
    local ok, res = rbe.try(http.request, { method = o.method or "POST", url = url,
      json = body, raise = false, timeout = o.timeout or "10s", retries = 0,
      headers = o.headers, ca_file = o.ca_file })
    local again, what, wait
    if not ok then
      if task_error(res) then error(res, 0) end
      if not res.retryable or attempt > retries then
        local e = rbe.error("notify", scrub(format("%s: %s", target, tostring(res.message)), secrets))
        e.code, e.target, e.retryable, e.attempts = res.code, target, res.retryable, attempt
        error(e, 0)
      end
      again, what = true, tostring(res.code)
    elseif (res.status == 429 or res.status >= 500) and attempt <= retries then
      again, what = true, tostring(res.status)
      wait = tonumber(res.headers["retry-after"])
    else
      return res
    end
    local delay = 0.2 * 2 ^ (attempt - 1)
    delay = delay / 2 + math.random() * delay / 2
    if wait then delay = math.max(delay, math.min(wait, 30)) end
    rbe.log("info", "notify: %s: %s; retry %d/%d in %.2fs", target, what, attempt, retries, delay)
    rbe.sleep(delay)
  end
end

local function status_error(target, res, want, secrets)
  local body = (res.body or ""):sub(1, 200):gsub("%s+", " ")
  local e = rbe.error("notify", scrub(format("%s: HTTP %d%s, want %s", target, res.status,
    body ~= "" and (" " .. body) or "", want), secrets))
  e.code, e.status, e.target = res.status, res.status, target
  e.retryable = res.status == 429 or res.status >= 500
  error(e, 0)
end

---------------------------------------------------------------------------
-- senders

local SLACK_OPTS = { webhook = true, text = true, blocks = true, username = true,
  icon_emoji = true, channel = true, timeout = true, retries = true, ca_file = true,
  thread_ts = true, unfurl_links = true }

-- notify.slack{webhook, text, blocks, username, icon_emoji, channel,
-- timeout = "10s"} -> {target, status}.  Slack answers 200 "ok".
function M.slack(o)
  if type(o) ~= "table" then error("notify.slack: options table expected", 2) end
  check_fields(o, SLACK_OPTS, "notify.slack")
  local url = as_secret(o.webhook, "webhook (the incoming webhook URL)", "notify.slack")
  if type(o.text) ~= "string" or o.text == "" then
    error("notify.slack: text expected (also the fallback of blocks)", 2)
  end
  local body = { text = o.text, username = o.username, icon_emoji = o.icon_emoji,
                 channel = o.channel, thread_ts = o.thread_ts, unfurl_links = o.unfurl_links }
  if o.blocks ~= nil then body.blocks = json.array(o.blocks) end
  local res = post("slack", url, body, { timeout = o.timeout, retries = o.retries,
    ca_file = o.ca_file }, { url })
  if res.status ~= 200 then status_error("slack", res, "200 ok", { url }) end
  return { target = "slack", status = res.status }
end

local PD_OPTS = { routing_key = true, action = true, dedup_key = true, summary = true,
  source = true, severity = true, component = true, group = true, class = true,
  custom_details = true, links = true, timestamp = true, url = true, timeout = true,
  retries = true, client = true, client_url = true, ca_file = true }

local function pd_url(o, path)
  local base = o.url or M.PAGERDUTY_URL
  if rbe.is_secret(base) then base = rbe.reveal(base) end
  return (tostring(base):gsub("/+$", "")) .. path
end

local function links_of(v)
  if v == nil then return nil end
  local out = json.array()
  for _, l in ipairs(v) do
    if type(l) == "string" then out[#out + 1] = { href = l }
    else out[#out + 1] = { href = l.href, text = l.text } end
  end
  return out
end

local function iso_now()
  return os.date("!%Y-%m-%dT%H:%M:%SZ")
end

-- notify.pagerduty{routing_key, action = "trigger" | "acknowledge" |
-- "resolve", dedup_key, summary, source, severity = "error", component,
-- group, class, custom_details, links, timestamp, url} -> {target,
-- status, dedup_key}: POST /v2/enqueue (202)
function M.pagerduty(o)
  if type(o) ~= "table" then error("notify.pagerduty: options table expected", 2) end
  check_fields(o, PD_OPTS, "notify.pagerduty")
  local key = as_secret(o.routing_key, "routing_key (the integration key)", "notify.pagerduty")
  local action = o.action or "trigger"
  if not ACTIONS[action] then
    error("notify.pagerduty: action must be trigger, acknowledge or resolve, got "
      .. tostring(action), 2)
  end
  local severity = o.severity or "error"
  if not SEVERITIES[severity] then
    error("notify.pagerduty: severity must be critical, error, warning or info, got "
      .. tostring(severity), 2)
  end
  if action ~= "trigger" and not o.dedup_key then
    error("notify.pagerduty: " .. action .. " needs the dedup_key of the alert", 2)
  end
  local body = { routing_key = key, event_action = action, dedup_key = o.dedup_key,
                 client = o.client or "rbe", client_url = o.client_url, links = links_of(o.links) }
  if action == "trigger" then
    if type(o.summary) ~= "string" or o.summary == "" then
      error("notify.pagerduty: summary expected for a trigger", 2)
    end
    body.payload = {
      summary = o.summary:sub(1, 1024), source = o.source or rbe.whoami().host,
      severity = severity, timestamp = o.timestamp or iso_now(), component = o.component,
      group = o.group, class = o.class, custom_details = o.custom_details,
    }
  end
  local secrets = { key }
  local res = post("pagerduty", pd_url(o, "/v2/enqueue"), body,
    { timeout = o.timeout, retries = o.retries, ca_file = o.ca_file }, secrets)
  if res.status ~= 202 then status_error("pagerduty", res, "202", secrets) end
  local ok, doc = pcall(json.decode, res.body or "")
  local dedup = ok and type(doc) == "table" and doc.dedup_key or o.dedup_key
  return { target = "pagerduty", status = res.status, action = action,
           dedup_key = dedup ~= json.null and dedup or nil }
end

local PDC_OPTS = { routing_key = true, summary = true, source = true, custom_details = true,
  links = true, timestamp = true, url = true, timeout = true, retries = true, ca_file = true }

-- notify.pagerduty_change{routing_key, summary, source, custom_details,
-- links, timestamp, url} -> {target, status}: POST /v2/change/enqueue (202)
function M.pagerduty_change(o)
  if type(o) ~= "table" then error("notify.pagerduty_change: options table expected", 2) end
  check_fields(o, PDC_OPTS, "notify.pagerduty_change")
  local key = as_secret(o.routing_key, "routing_key (the integration key)",
    "notify.pagerduty_change")
  if type(o.summary) ~= "string" or o.summary == "" then
    error("notify.pagerduty_change: summary expected", 2)
  end
  local body = { routing_key = key, links = links_of(o.links), payload = {
    summary = o.summary:sub(1, 1024), source = o.source or rbe.whoami().host,
    timestamp = o.timestamp or iso_now(), custom_details = o.custom_details } }
  local secrets = { key }
  local res = post("pagerduty_change", pd_url(o, "/v2/change/enqueue"), body,
    { timeout = o.timeout, retries = o.retries, ca_file = o.ca_file }, secrets)
  if res.status ~= 202 then status_error("pagerduty_change", res, "202", secrets) end
  return { target = "pagerduty_change", status = res.status }
end

local HOOK_OPTS = { url = true, json = true, headers = true, timeout = true,
  retries = true, ca_file = true, method = true }

-- notify.webhook{url, json, headers, method = "POST", timeout} -> {target,
-- status}; any 2xx is success
function M.webhook(o)
  if type(o) ~= "table" then error("notify.webhook: options table expected", 2) end
  check_fields(o, HOOK_OPTS, "notify.webhook")
  local url = as_secret(o.url, "url", "notify.webhook")
  local secrets = { url }
  for _, v in pairs(o.headers or {}) do
    if rbe.is_secret(v) then secrets[#secrets + 1] = v end
  end
  local res = post("webhook", url, o.json, { method = o.method, timeout = o.timeout,
    retries = o.retries, headers = o.headers, ca_file = o.ca_file }, secrets)
  if res.status < 200 or res.status >= 300 then status_error("webhook", res, "2xx", secrets) end
  return { target = "webhook", status = res.status }
end

---------------------------------------------------------------------------
-- the runbooks' messages

local function dur(s)
  if type(s) ~= "number" then return nil end
  if s < 60 then return format("%ds", math.floor(s + 0.5)) end
  if s < 3600 then return format("%dm%02ds", s // 60, math.floor(s % 60)) end
  return format("%dh%02dm", s // 3600, math.floor(s % 3600) // 60)
end
M.fmt_duration = dur

local function one_line(s, n)
  s = tostring(s):gsub("%s*\n%s*", " ")
  if n and #s > n then s = s:sub(1, n - 3) .. "..." end
  return s
end

local HEAD = {
  started = { emoji = ":rotating_light:", title = "Rollback started" },
  progress = { emoji = ":hourglass_flowing_sand:", title = "Rollback in progress" },
  done = { emoji = ":white_check_mark:", title = "Rollback done" },
  failed = { emoji = ":x:", title = "Rollback FAILED" },
}

-- notify.message(kind, info) -> {kind, title, text, summary, blocks,
-- fields}.  kind: "started" | "progress" | "done" | "failed"; info:
-- {playbook, reason, user, host, run_id, phase, elapsed, budget, result,
-- report, step, error, trigger}.  `text` is Slack mrkdwn, `summary` plain
-- (PagerDuty), `fields` the same facts as a table (webhooks).
function M.message(kind, info)
  local head = HEAD[kind]
  if not head then
    error("notify.message: kind must be started, progress, done or failed, got "
      .. tostring(kind), 2)
  end
  info = info or {}
  local pbname = tostring(info.playbook or "rollback")
  local facts = {}
  local function fact(label, value)
    if value ~= nil and value ~= "" then facts[#facts + 1] = { label, tostring(value) } end
  end
  fact("Reason", info.reason and one_line(info.reason, 300))
  if kind == "started" then
    fact("Started by", info.user and (tostring(info.user) .. (info.host and (" on " .. info.host) or "")))
    fact("Budget", dur(info.budget))
    if type(info.trigger) == "table" and info.trigger.reason then
      fact("Trigger", one_line(info.trigger.reason, 300))
    end
  elseif kind == "progress" then
    fact("Phase", info.phase and (tostring(info.phase) .. " done"))
    fact("Steps", info.steps_done and info.steps_total
      and format("%d of %d", info.steps_done, info.steps_total))
    fact("Elapsed", dur(info.elapsed) and (dur(info.elapsed)
      .. (info.budget and (" of " .. dur(info.budget)) or "")))
  else
    fact("Result", info.result)
    fact("Elapsed", dur(info.elapsed) and (dur(info.elapsed)
      .. (info.budget and (" (budget " .. dur(info.budget) .. ")") or "")))
    if kind == "failed" then
      fact("Failed step", info.step)
      fact("Error", info.error and one_line(info.error, 300))
    end
    fact("Report", info.report)
  end
  fact("Run", info.run_id)

  local title = head.title .. ": " .. pbname
  local lines = { head.emoji .. " *" .. head.title .. ":* " .. pbname }
  local plain = { title }
  for _, f in ipairs(facts) do
    lines[#lines + 1] = "*" .. f[1] .. ":* " .. f[2]
    if f[1] ~= "Run" then plain[#plain + 1] = f[1]:lower() .. ": " .. f[2] end
  end
  local fields = { kind = kind, playbook = pbname }
  for _, k in ipairs { "reason", "user", "host", "run_id", "phase", "elapsed", "budget",
                       "result", "report", "step", "error", "exit_code", "steps_done",
                       "steps_total" } do
    if info[k] ~= nil then fields[k] = info[k] end
  end
  if type(info.trigger) == "table" then fields.trigger = info.trigger end
  local sfields = json.array()
  for _, f in ipairs(facts) do
    if #sfields < 10 and f[1] ~= "Run" then
      sfields[#sfields + 1] = { type = "mrkdwn", text = "*" .. f[1] .. "*\n" .. f[2] }
    end
  end
  local blocks = json.array {
    { type = "header", text = { type = "plain_text", text = one_line(title, 150) } },
  }
  if #sfields > 0 then blocks[#blocks + 1] = { type = "section", fields = sfields } end
  if info.run_id then
    blocks[#blocks + 1] = { type = "context", elements = json.array {
      { type = "mrkdwn", text = "run `" .. tostring(info.run_id) .. "`"
        .. (info.host and (" on " .. tostring(info.host)) or "") } } }
  end
  return { kind = kind, title = title, text = concat(lines, "\n"),
           summary = one_line(concat(plain, "; "), 1024), blocks = blocks, fields = fields }
end

---------------------------------------------------------------------------
-- sending to several targets, failures journaled

local TARGET_KINDS = { slack = true, pagerduty = true, pagerduty_change = true, webhook = true }

local resolve = kit.resolve

-- a target's config with function values resolved
local function config_of(cfg, ctx)
  local out = {}
  for k, v in pairs(cfg) do out[k] = resolve(v, ctx) end
  return out
end

-- the targets of a spec as a list of {kind, cfg}; each kind may hold one
-- config table or a list of them
local function targets_of(spec)
  local list = {}
  for _, kind in ipairs { "slack", "pagerduty", "pagerduty_change", "webhook" } do
    local v = spec[kind]
    if v ~= nil then
      if type(v) ~= "table" and type(v) ~= "function" then
        error(format("notify: %s must be a table of options (or a list of them)", kind), 3)
      end
      if type(v) == "table" and v[1] ~= nil then
        for _, c in ipairs(v) do list[#list + 1] = { kind = kind, cfg = c } end
      else
        list[#list + 1] = { kind = kind, cfg = v }
      end
    end
  end
  return list
end

-- send one message to one target; for PagerDuty the message's kind picks
-- the event: started/progress/failed trigger (progress: skipped), done
-- resolves, under dedup key "rbe-<run id>" unless the config names one
local function send_one(t, msg, ctx)
  local cfg = type(t.cfg) == "function" and t.cfg(ctx) or config_of(t.cfg, ctx)
  local f = msg.fields or {}
  if t.kind == "slack" then
    local o = { webhook = cfg.webhook, text = msg.text, blocks = msg.blocks,
                username = cfg.username, icon_emoji = cfg.icon_emoji, channel = cfg.channel,
                timeout = cfg.timeout, retries = cfg.retries, ca_file = cfg.ca_file }
    return M.slack(o)
  elseif t.kind == "pagerduty" then
    if msg.kind == "progress" and not cfg.progress then
      return { target = "pagerduty", skipped = "progress is not sent to PagerDuty" }
    end
    local dedup = cfg.dedup_key or (f.run_id and ("rbe-" .. tostring(f.run_id)))
    local o = { routing_key = cfg.routing_key, url = cfg.url, timeout = cfg.timeout,
                retries = cfg.retries, ca_file = cfg.ca_file, dedup_key = dedup,
                source = cfg.source, component = cfg.component, group = cfg.group,
                class = cfg.class, links = cfg.links }
    if msg.kind == "done" then
      o.action = "resolve"
      if not dedup then return { target = "pagerduty", skipped = "no dedup key to resolve" } end
    else
      o.action = "trigger"
      o.summary = msg.summary
      o.severity = msg.kind == "failed" and (cfg.failed_severity or "critical")
                   or (cfg.severity or "warning")
      o.custom_details = f
    end
    return M.pagerduty(o)
  elseif t.kind == "pagerduty_change" then
    if msg.kind ~= "done" and msg.kind ~= "failed" and not cfg.all then
      return { target = "pagerduty_change", skipped = "change events are sent at the end" }
    end
    return M.pagerduty_change { routing_key = cfg.routing_key, url = cfg.url,
      summary = msg.summary, source = cfg.source, custom_details = f, links = cfg.links,
      timeout = cfg.timeout, retries = cfg.retries, ca_file = cfg.ca_file }
  else
    local payload = { event = "rbe.rollback." .. tostring(msg.kind), text = msg.summary }
    for k, v in pairs(f) do payload[k] = v end
    return M.webhook { url = cfg.url, json = payload, headers = cfg.headers,
      method = cfg.method, timeout = cfg.timeout, retries = cfg.retries, ca_file = cfg.ca_file }
  end
end

-- notify.send(targets, msg, {required, log, ctx}) -> results.  targets:
-- {slack = cfg | {cfg...}, pagerduty = ..., pagerduty_change = ...,
-- webhook = ...}; msg: notify.message(...) or a string.  Every target is
-- tried (concurrently); each failure is given to log(fmt, ...) (ctx.log
-- in a step: the journal) and, unless required, does not raise.
-- results[i] = {target, ok, status | skipped | error}.
function M.send(spec, msg, o)
  o = o or {}
  if type(spec) ~= "table" then error("notify.send: targets table expected", 2) end
  if type(msg) == "string" then
    msg = { kind = "message", text = msg, summary = msg, fields = { text = msg } }
  elseif type(msg) ~= "table" or type(msg.text) ~= "string" then
    error("notify.send: a message (notify.message(...) or a string) expected", 2)
  end
  local targets = targets_of(spec)
  local results = {}
  local fns = {}
  for i, t in ipairs(targets) do
    fns[i] = function()
      local ok, r = rbe.try(send_one, t, msg, o.ctx)
      if ok then
        r.ok = true
        results[i] = r
      else
        if task_error(r) then error(r, 0) end
        results[i] = { target = t.kind, ok = false, error = tostring(r), code = r.code }
      end
    end
  end
  if #fns > 0 then rbe.all(fns) end
  local failed = {}
  for _, r in ipairs(results) do
    if not r.ok then
      failed[#failed + 1] = r
      if o.log then pcall(o.log, "notification to %s failed: %s", r.target, r.error) end
    end
  end
  if #failed > 0 and o.required then
    local texts = {}
    for _, r in ipairs(failed) do texts[#texts + 1] = r.error end
    local e = rbe.error("notify", "required notification failed: " .. concat(texts, "; "))
    e.code = failed[1].code
    e.results = results
    error(e, 0)
  end
  return results
end

---------------------------------------------------------------------------
-- a playbook step

local STEP_FIELDS = { timeout = true, retries = true, backoff = true, on_failure = true,
  description = true, when = true }

-- the facts of the run a step or hook can see
local function run_info(ctx)
  local info = { playbook = ctx.playbook, run_id = ctx.run_id, reason = ctx.reason }
  local who = rbe.whoami()
  info.user, info.host = ctx.user or who.user, who.host
  return info
end

-- notify.step{slack = ..., pagerduty = ..., webhook = ..., message =
-- "started" | "progress" | "done" | "failed" | text | function(ctx) ->
-- text or message, info = {...} | function(ctx), required = false} -> a
-- pb.step spec.  Its result lists each target's outcome.
function M.step(o)
  if type(o) ~= "table" then error("notify.step: options table expected", 2) end
  for k in pairs(o) do
    if not TARGET_KINDS[k] and not STEP_FIELDS[k] and k ~= "message" and k ~= "required"
       and k ~= "info" then
      error(format("notify.step: unknown option '%s'", tostring(k)), 2)
    end
  end
  if #targets_of(o) == 0 then
    error("notify.step: no target (slack, pagerduty, pagerduty_change or webhook)", 2)
  end
  local spec = {}
  for k in pairs(STEP_FIELDS) do spec[k] = o[k] end
  local function build(ctx)
    local m = o.message or "progress"
    if type(m) == "function" then m = m(ctx) end
    if type(m) == "string" and HEAD[m] then
      local info = run_info(ctx)
      local extra = resolve(o.info, ctx)
      for k, v in pairs(extra or {}) do info[k] = v end
      m = M.message(m, info)
    end
    return m
  end
  spec.run = function(ctx)
    local results = M.send(o, build(ctx), { required = o.required, log = ctx.log, ctx = ctx })
    local out = {}
    for i, r in ipairs(results) do
      out[i] = { target = r.target, ok = r.ok, status = r.status, skipped = r.skipped,
                 error = r.error }
    end
    return out
  end
  spec.plan = function(ctx)
    local m = build(ctx)
    local names = {}
    for _, t in ipairs(targets_of(o)) do names[#names + 1] = t.kind end
    return format("would send to %s%s: %s", concat(names, ", "),
      o.required and " (required)" or "", one_line(m.summary or m.text, 200))
  end
  return spec
end

---------------------------------------------------------------------------
-- the playbook's `notify` field

-- notify.on_run{slack = ..., pagerduty = ..., webhook = ..., on = {kinds}}
-- -> function(kind, info), for pb.playbook { notify = ... }.  The runner
-- calls it when the run starts, after each phase (progress) and at the
-- end (done / failed); config values may be function(ctx).  "started"
-- and "progress" are sent in the background (the rollback does not wait
-- for Slack); "done"/"failed" wait for those, then send.  Each outcome is
-- journaled through info.journal.
function M.on_run(o)
  if type(o) ~= "table" then error("notify.on_run: options table expected", 2) end
  for k in pairs(o) do
    if not TARGET_KINDS[k] and k ~= "on" then
      error(format("notify.on_run: unknown option '%s'", tostring(k)), 2)
    end
  end
  if #targets_of(o) == 0 then
    error("notify.on_run: no target (slack, pagerduty, pagerduty_change or webhook)", 2)
  end
  local wanted = {}
  for _, k in ipairs(o.on or M.KINDS) do
    if not HEAD[k] then error("notify.on_run: unknown kind in on: " .. tostring(k), 2) end
    wanted[k] = true
  end
  local pending = {}

  local function deliver(kind, info)
    local msg = M.message(kind, info)
    local journal = info.journal or function() end
    local ok, results = rbe.try(M.send, o, msg, { ctx = info.ctx })
    if not ok then
      journal { kind = kind, ok = false, error = tostring(results) }
      return
    end
    for _, r in ipairs(results) do
      journal { kind = kind, target = r.target, ok = r.ok, status = r.status,
                skipped = r.skipped, error = r.error }
      if not r.ok then
        rbe.log("warn", "notification (%s) to %s failed: %s", kind, r.target, r.error)
      end
    end
  end

  local hook = function(kind, info)
    if not wanted[kind] then return end
    info = info or {}
    if kind == "done" or kind == "failed" then
      for _, t in ipairs(pending) do
        if not t:done() then pcall(rbe.wait_any, { t }) end
      end
      pending = {}
      return deliver(kind, info)
    end
    local t = rbe.spawn(function() pcall(deliver, kind, info) end)
    pending[#pending + 1] = t
  end
  return setmetatable({ targets = o }, { __call = function(_, kind, info)
    return hook(kind, info)
  end, __name = "notify.on_run" })
end

return M
