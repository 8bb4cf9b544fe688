-- vercel: point production back at the last good deployment, through
-- Vercel's REST API (https://api.vercel.com, or any base URL: the drill's
-- fake, a proxy).  A client holds the configuration (token, team, base
-- URL); its methods list deployments, read the project's production
-- target, move aliases, promote and roll back (waiting for the alias job
-- to finish).  The *_step builders return pb.step specs with run, undo
-- and plan, whose fields may be functions of ctx (vars are resolved at run
-- time).  The token is an rbe.secret from the start: it never appears in
-- an error, a log line, the journal or the report.
--
--   local v = vercel.client { token = ..., base_url = ..., team_id = ... }
--   v:deployments{project, target, state, limit} -> list      [yields]
--   v:current(project) -> deployment | nil                     [yields]
--   v:last_good{project, before} -> deployment                 [yields]
--   v:alias(deployment, alias) -> {alias, previous, changed}   [yields]
--   v:promote(project, deployment) / v:rollback(...) -> job    [yields]
--   vercel.promote_step{...}, vercel.rollback_step{...}, vercel.alias_step{...}
--
-- See docs/modules/vercel.md.
local rbe = require "rbe"
local kit = require "rbe.stepkit"
local http = require "rbe.http"
local json = require "rbe.json"

local type, pairs, ipairs, error, tostring, setmetatable, next =
  type, pairs, ipairs, error, tostring, setmetatable, next
local format, concat = string.format, table.concat

local M = {}

M.DEFAULT_BASE_URL = "https://api.vercel.com"

local CLIENT_OPTS = { token = true, base_url = true, team_id = true, slug = true,
  timeout = true, retries = true, wait = true, poll = true, ca_file = true }
local RETRY_STATUS = { [429] = true, [500] = true, [502] = true, [503] = true,
  [504] = true }

---------------------------------------------------------------------------
-- helpers

local function nn(v)
  if v == json.null or v == rbe.null then return nil end
  return v
end

local function check_fields(t, known, fname)
  for k in pairs(t) do
    if not known[k] then
      error(format("%s: unknown option '%s'", fname, tostring(k)), 3)
    end
  end
end

local function esc(s)
  return http.escape(tostring(s))
end

-- a deployment given as an id string or a table (as the API returns them)
local function dep_id(d, fname)
  if type(d) == "string" and d ~= "" then return d end
  if type(d) == "table" then
    local id = nn(d.id) or nn(d.uid)
    if type(id) == "string" then return id end
  end
  error(format("%s: a deployment id (\"dpl_...\") or a deployment table "
    .. "expected, got %s", fname, type(d)), 3)
end

local function check_project(p, fname)
  if type(p) ~= "string" or p == "" then
    error(fname .. ": project (id or name) expected, got " .. type(p), 3)
  end
  return p
end

-- what a deployment looks like in a message: "dpl_x (2.0.0, abc1234)"
local function describe(d)
  if type(d) ~= "table" then return tostring(d) end
  local bits = {}
  local meta = nn(d.meta)
  if type(meta) == "table" then
    if nn(meta.appVersion) then bits[#bits + 1] = tostring(meta.appVersion) end
    local sha = nn(meta.githubCommitSha)
    if type(sha) == "string" then bits[#bits + 1] = "commit " .. sha:sub(1, 7) end
  end
  local created = nn(d.created) or nn(d.createdAt)
  if type(created) == "number" then
    bits[#bits + 1] = "created " .. os.date("!%Y-%m-%d %H:%M", created // 1000) .. "Z"
  end
  local id = nn(d.id) or nn(d.uid) or "?"
  return #bits > 0 and (id .. " (" .. concat(bits, ", ") .. ")") or id
end
M.describe = describe

-- a deployment as the API gave it, plus `id` (lists call it `uid`)
local function shaped(d)
  if type(d) ~= "table" then return nil end
  d.id = nn(d.id) or nn(d.uid)
  return d
end

---------------------------------------------------------------------------
-- the client

local Client = {}
Client.__index = Client
Client.__name = "vercel.client"

-- vercel.client{token, base_url, team_id, slug, timeout, retries, wait,
-- poll, ca_file} -> client
function M.client(cfg)
  if type(cfg) ~= "table" then
    error("vercel.client: options table expected, got " .. type(cfg), 2)
  end
  check_fields(cfg, CLIENT_OPTS, "vercel.client")
  local token = cfg.token
  if rbe.is_secret(token) then
    if type(rbe.reveal(token)) ~= "string" or rbe.reveal(token) == "" then
      error("vercel.client: token must be a non-empty string", 2)
    end
  elseif type(token) == "string" and token ~= "" then
    token = rbe.secret(token)
  else
    error("vercel.client: token (a Vercel access token) is required", 2)
  end
  local base = cfg.base_url or M.DEFAULT_BASE_URL
  if type(base) ~= "string" or not base:lower():find("^https?://") then
    error("vercel.client: base_url must be an http:// or https:// URL", 2)
  end
  base = base:gsub("/+$", "")
  local c = setmetatable({
    base_url = base, team_id = cfg.team_id, slug = cfg.slug, _token = token,
    wait = rbe.duration(cfg.wait or "3m"), poll = rbe.duration(cfg.poll or "1s"),
  }, Client)
  c._http = http.client {
    base_url = base, auth = { bearer = token },
    headers = { Accept = "application/json" },
    timeout = cfg.timeout or "20s", retries = cfg.retries or 2,
    ca_file = cfg.ca_file, raise = false,
  }
  return c
end

function Client:close()
  if self._http then self._http:close() end
end
Client.__close = Client.close

Client.__tostring = function(c)
  return "vercel client " .. http.mask_url(c.base_url)
    .. (c.team_id and (" team " .. tostring(c.team_id)) or "")
end

-- Remove the token from a text (defence in depth: Vercel does not echo it).
function Client:_scrub(s)
  s = tostring(s)
  local tok = rbe.reveal(self._token)
  if #tok >= 3 then
    local a, b = s:find(tok, 1, true)
    while a do
      s = s:sub(1, a - 1) .. "***" .. s:sub(b + 1)
      a, b = s:find(tok, a + 3, true)
    end
  end
  return s
end

function Client:_error(method, path, fields)
  local e = rbe.error("vercel", self:_scrub(fields.message))
  for k, v in pairs(fields) do
    if k ~= "message" then e[k] = type(v) == "string" and self:_scrub(v) or v end
  end
  e.method, e.path = method, path
  if e.retryable == nil then e.retryable = false end
  return e
end

-- One API call: the decoded body (nil when empty), or raise a `vercel`
-- error with Vercel's error code ("forbidden", "deployment_not_found")
-- and the HTTP status.
function Client:_call(method, path, o)
  o = o or {}
  local query = {}
  for k, v in pairs(o.query or {}) do query[k] = v end
  if self.team_id then query.teamId = self.team_id end
  if self.slug then query.slug = self.slug end
  local ok, res = rbe.try(self._http.request, self._http, {
    method = method, url = path, query = next(query) and query or nil,
    json = o.json, retry_unsafe = false,
  })
  if not ok then
    local err = res
    -- timeouts and cancels travel unchanged: the runner tells a budget
    -- expiry and an interrupt from a failure by their kind
    if err.kind == "cancelled" or err.kind == "timeout" then error(err, 0) end
    error(self:_error(method, path, {
      message = format("%s %s: %s", method, path, tostring(err.message or err)),
      code = err.code, retryable = err.retryable, cause = err.kind,
    }), 0)
  end
  local body
  if res.body and res.body ~= "" then
    local jok, v = pcall(json.decode, res.body)
    if jok then body = v end
  end
  if res.status >= 400 then
    local verr = type(body) == "table" and type(nn(body.error)) == "table" and body.error or {}
    local code = nn(verr.code) or res.status
    local msg = nn(verr.message)
    if type(msg) ~= "string" then
      msg = (res.body or ""):sub(1, 200):gsub("%s+", " ")
    end
    error(self:_error(method, path, {
      message = format("%s %s -> %d %s%s", method, path, res.status,
        tostring(code), msg ~= "" and (": " .. msg) or ""),
      code = code, status = res.status, retryable = RETRY_STATUS[res.status] or false,
      vercel = verr,
    }), 0)
  end
  return body, res
end

---------------------------------------------------------------------------
-- reading

local DEPLOYMENTS_OPTS = { project = true, target = true, state = true, limit = true,
  page_size = true, since = true, ["until"] = true }

-- client:deployments{project, target = "production", state = "READY",
-- limit, page_size = 20, since, until} -> list, newest first.  Follows
-- pagination.next until `limit` deployments (default: all of them).
-- target = false / state = false: no filter.
function Client:deployments(o)
  if type(o) ~= "table" then error("vercel:deployments: options table expected", 2) end
  check_fields(o, DEPLOYMENTS_OPTS, "vercel:deployments")
  local project = check_project(o.project, "vercel:deployments")
  local target = o.target == nil and "production" or o.target
  local state = o.state == nil and "READY" or o.state
  if type(state) == "table" then state = concat(state, ",") end
  local limit = o.limit
  if limit ~= nil and (math.type(limit) ~= "integer" or limit < 1) then
    error("vercel:deployments: limit must be a positive integer", 2)
  end
  local page_size = o.page_size or 20
  local out, until_, pages = {}, o["until"], 0
  while true do
    local want = page_size
    if limit then want = math.min(want, limit - #out) end
    local body = self:_call("GET", "/v6/deployments", { query = {
      projectId = project, target = target or nil, state = state or nil,
      limit = want, ["until"] = until_, since = o.since } })
    pages = pages + 1
    local list = type(body) == "table" and nn(body.deployments) or {}
    for _, d in ipairs(list) do
      out[#out + 1] = shaped(d)
      if limit and #out >= limit then return out end
    end
    local pag = type(body) == "table" and nn(body.pagination) or nil
    local nxt = type(pag) == "table" and nn(pag.next) or nil
    -- a next that does not move back in time would loop forever
    if not nxt or #list == 0 or nxt == until_ or pages >= 1000 then return out end
    until_ = nxt
  end
end

-- client:deployment(id_or_url) -> deployment
function Client:deployment(d)
  local id = dep_id(d, "vercel:deployment")
  return shaped(self:_call("GET", "/v13/deployments/" .. esc(id)))
end

-- client:project(project) -> the project (targets, lastAliasRequest, ...)
function Client:project(p)
  check_project(p, "vercel:project")
  return self:_call("GET", "/v9/projects/" .. esc(p))
end

-- client:current(project) -> the production deployment, or nil
function Client:current(p)
  check_project(p, "vercel:current")
  local proj = self:project(p)
  local targets = type(proj) == "table" and nn(proj.targets)
  return type(targets) == "table" and shaped(nn(targets.production)) or nil
end

-- client:last_good{project, before = deployment} -> the newest READY
-- production deployment created before `before` (default: the current
-- production deployment)
function Client:last_good(o)
  if type(o) ~= "table" then error("vercel:last_good: options table expected", 2) end
  check_fields(o, { project = true, before = true }, "vercel:last_good")
  local project = check_project(o.project, "vercel:last_good")
  local before = o.before
  if before == nil then
    before = self:current(project)
    if not before then
      error(self:_error("GET", "/v9/projects/" .. project, {
        message = "project " .. project .. " has no production deployment to go back from",
        code = "ENOTFOUND" }), 0)
    end
  elseif type(before) ~= "table" or not nn(before.created) then
    before = self:deployment(before)
  end
  local bid = before.id or before.uid
  local list = self:deployments { project = project, target = "production", state = "READY",
    ["until"] = nn(before.created), limit = 10 }
  for _, d in ipairs(list) do
    if d.id ~= bid then return d end
  end
  error(self:_error("GET", "/v6/deployments", {
    message = format("no READY production deployment of %s before %s",
      project, describe(before)), code = "ENOTFOUND" }), 0)
end

---------------------------------------------------------------------------
-- aliases

-- client:alias(deployment, alias) -> {alias, uid, deployment, previous,
-- changed}.  `previous` is the deployment the alias pointed at before
-- (Vercel's oldDeploymentId; nil for a new alias): the undo target.  An
-- alias already on that deployment (409) is success with changed = false.
function Client:alias(d, alias)
  local id = dep_id(d, "vercel:alias")
  if type(alias) ~= "string" or alias == "" then
    error("vercel:alias: alias (a host name) expected, got " .. type(alias), 2)
  end
  local path = "/v2/deployments/" .. esc(id) .. "/aliases"
  local ok, body = rbe.try(self._call, self, "POST", path, { json = { alias = alias } })
  if ok then
    return { alias = nn(body.alias) or alias, uid = nn(body.uid), deployment = id,
             previous = nn(body.oldDeploymentId), changed = true }
  end
  local err = body
  if err.kind == "vercel" and err.status == 409 then
    local on = type(err.vercel) == "table" and nn(err.vercel.deploymentId)
    if on == nil then
      local aok, a = rbe.try(self._call, self, "GET", "/v4/aliases/" .. esc(alias))
      if aok and type(a) == "table" then
        on = nn(a.deploymentId) or (type(nn(a.deployment)) == "table" and nn(a.deployment.id))
      end
    end
    if on == id then
      return { alias = alias, deployment = id, previous = id, changed = false,
               already = true }
    end
  end
  error(err, 0)
end

-- client:aliases(deployment) -> list of {alias, uid, ...}
function Client:aliases(d)
  local id = dep_id(d, "vercel:aliases")
  local body = self:_call("GET", "/v2/deployments/" .. esc(id) .. "/aliases")
  return type(body) == "table" and nn(body.aliases) or {}
end

-- client:alias_target(alias) -> the id of the deployment it points at, or nil
function Client:alias_target(alias)
  local ok, a = rbe.try(self._call, self, "GET", "/v4/aliases/" .. esc(alias))
  if not ok then
    if a.kind == "vercel" and a.status == 404 then return nil end
    error(a, 0)
  end
  return nn(a.deploymentId) or (type(nn(a.deployment)) == "table" and nn(a.deployment.id)) or nil
end

-- client:remove_alias(alias) -> true (DELETE /v2/aliases/{idOrAlias})
function Client:remove_alias(alias)
  self:_call("DELETE", "/v2/aliases/" .. esc(alias))
  return true
end

---------------------------------------------------------------------------
-- promote / rollback

-- The aliases that did not move in a failed alias job: Vercel's promote
-- alias status (failedOnly), else those still on the old deployment.
function Client:_failed_aliases(project, from)
  local ok, body = rbe.try(self._call, self, "GET",
    "/v1/projects/" .. esc(project) .. "/promote/aliases", { query = { failedOnly = "true" } })
  local names = {}
  if ok and type(body) == "table" and type(nn(body.aliases)) == "table" then
    for _, a in ipairs(body.aliases) do
      names[#names + 1] = type(a) == "table" and tostring(nn(a.alias) or nn(a.id)) or tostring(a)
    end
    return names
  end
  if from then
    local aok, list = rbe.try(self.aliases, self, from)
    if aok then
      for _, a in ipairs(list) do names[#names + 1] = tostring(nn(a.alias)) end
      return names
    end
  end
  return nil
end

-- Wait until the project's lastAliasRequest for `to` has succeeded; raise
-- on "failed" (naming the aliases that did not move) or after `wait`.
function Client:wait_alias_job(project, to, o)
  o = o or {}
  local wait = o.wait and rbe.duration(o.wait) or self.wait
  local poll = o.poll and rbe.duration(o.poll) or self.poll
  local kind = o.kind or "promote"
  local deadline = rbe.now() + wait
  local last
  while true do
    local proj = self:project(project)
    local req = type(proj) == "table" and nn(proj.lastAliasRequest)
    if type(req) == "table" and nn(req.toDeploymentId) == to then
      last = nn(req.jobStatus)
      if last == "succeeded" then return req end
      if last == "failed" then
        local from = nn(req.fromDeploymentId)
        local names = self:_failed_aliases(project, from)
        error(self:_error("GET", "/v9/projects/" .. project, {
          message = format("%s of %s to production of %s failed (jobStatus failed); "
            .. "%s", kind, to, project, names
              and ((#names > 0 and ("aliases not moved: " .. concat(names, ", ")))
                   or "no alias reported as failed")
              or "the failed aliases could not be listed"),
          code = kind .. "_failed", aliases = names, from = from, to = to }), 0)
      end
      if last == "skipped" then
        local t = nn(proj.targets)
        local prod = type(t) == "table" and nn(t.production)
        if type(prod) == "table" and (nn(prod.id) or nn(prod.uid)) == to then return req end
        error(self:_error("GET", "/v9/projects/" .. project, {
          message = format("%s of %s to production of %s was skipped and "
            .. "production is still elsewhere", kind, to, project),
          code = kind .. "_skipped", to = to }), 0)
      end
    end
    if rbe.now() + poll > deadline then
      error(self:_error("GET", "/v9/projects/" .. project, {
        message = format("%s of %s to production of %s did not finish within %s "
          .. "(last jobStatus: %s)", kind, to, project, format("%gs", wait),
          tostring(last or "not seen")),
        code = "ETIMEDOUT", retryable = true, to = to }), 0)
    end
    rbe.sleep(poll)
  end
end

local function alias_job(self, kind, project, d, o, fname)
  check_project(project, fname)
  local id = dep_id(d, fname)
  o = o or {}
  local before = self:current(project)
  local path, query
  if kind == "promote" then
    path = "/v10/projects/" .. esc(project) .. "/promote/" .. esc(id)
  else
    path = "/v1/projects/" .. esc(project) .. "/rollback/" .. esc(id)
    if o.description then query = { description = tostring(o.description) } end
  end
  self:_call("POST", path, { query = query })
  local req = {}
  if o.wait ~= false then
    req = self:wait_alias_job(project, id, { wait = o.wait, poll = o.poll, kind = kind })
  end
  return { project = project, to = id, from = nn(req.fromDeploymentId) or (before and before.id),
           previous = before and before.id, job_status = nn(req.jobStatus) or "requested" }
end

-- client:promote(project, deployment[, {wait, poll}]) -> {project, to,
-- from, previous, job_status}: POST /v10/projects/{p}/promote/{d}, then
-- wait for the alias job (wait = false: do not wait)
function Client:promote(project, d, o)
  return alias_job(self, "promote", project, d, o, "vercel:promote")
end

-- client:rollback(project, deployment[, {description, wait, poll}]): the
-- same through POST /v1/projects/{p}/rollback/{d}
function Client:rollback(project, d, o)
  return alias_job(self, "rollback", project, d, o, "vercel:rollback")
end

---------------------------------------------------------------------------
-- playbook steps

-- step fields a builder passes through to pb.step
local STEP_FIELDS = { timeout = true, undo_timeout = true, retries = true, backoff = true,
  confirm = true, on_failure = true, description = true, when = true }

local resolve = kit.resolve

local function step_client(o, ctx)
  return M.client { token = resolve(o.token, ctx), base_url = resolve(o.base_url, ctx),
    team_id = resolve(o.team_id, ctx), timeout = o.request_timeout, wait = o.wait,
    poll = o.poll, ca_file = resolve(o.ca_file, ctx) }
end

local function base_spec(o, known, fname)
  if type(o) ~= "table" then error(fname .. ": options table expected", 3) end
  for k in pairs(o) do
    if not known[k] and not STEP_FIELDS[k] then
      error(format("%s: unknown option '%s'", fname, tostring(k)), 3)
    end
  end
  if o.token == nil then error(fname .. ": token is required (a value or function(ctx))", 3) end
  if o.project == nil then error(fname .. ": project is required", 3) end
  local spec = {}
  for k in pairs(STEP_FIELDS) do spec[k] = o[k] end
  return spec
end

-- the deployment a step moves production to: an id, a table,
-- "last_good" (before the current production) or function(ctx, client)
local function target_of(o, ctx, c, project, cur)
  local to = o.to
  if type(to) == "function" then to = to(ctx, c) end
  if to == nil or to == "last_good" then
    return c:last_good { project = project, before = cur }
  end
  if type(to) == "table" then return shaped(to) end
  return c:deployment(to)
end

local STEP_OPTS = { token = true, base_url = true, team_id = true, ca_file = true,
  project = true, to = true, wait = true, poll = true, request_timeout = true,
  description_text = true }

local function job_step(kind, o, fname)
  local spec = base_spec(o, STEP_OPTS, fname)
  local verb = kind == "promote" and "promote" or "roll back to"

  spec.run = function(ctx)
    local c <close> = step_client(o, ctx)
    local project = resolve(o.project, ctx)
    local cur = c:current(project)
    local target = target_of(o, ctx, c, project, cur)
    local result = { project = project, to = target.id, previous = cur and cur.id,
                     changed = not (cur and cur.id == target.id) }
    if not result.changed then
      ctx.log("vercel: %s is already production of %s", target.id, project)
      return result
    end
    ctx.log("vercel: %s %s (production now %s)", verb, describe(target),
            cur and describe(cur) or "none")
    local r
    if kind == "promote" then
      r = c:promote(project, target.id)
    else
      local desc = resolve(o.description_text, ctx)
        or ("rbe run " .. tostring(ctx.run_id) .. " (" .. tostring(ctx.playbook) .. ")")
      r = c:rollback(project, target.id, { description = desc })
    end
    result.previous = r.from or result.previous
    result.job_status = r.job_status
    return result
  end

  spec.undo = function(ctx)
    local res = ctx.results[ctx.step]
    if type(res) ~= "table" or not res.changed or not res.previous then
      ctx.log("vercel: nothing to undo (production was not moved)")
      return
    end
    local c <close> = step_client(o, ctx)
    ctx.log("vercel: promoting %s back to production of %s", res.previous, res.project)
    -- a rollback is undone by a promote (it also turns auto-assignment
    -- of production domains back on)
    c:promote(res.project, res.previous)
  end

  spec.plan = function(ctx)
    local c <close> = step_client(o, ctx)
    local project = resolve(o.project, ctx)
    local cur = c:current(project)
    local target = target_of(o, ctx, c, project, cur)
    if cur and cur.id == target.id then
      return format("nothing: %s is already production of %s", describe(target), project)
    end
    return {
      format("would %s %s as production of %s", verb, describe(target), project),
      format("production is now %s; undo promotes it back", cur and describe(cur) or "none"),
    }
  end
  return spec
end

-- vercel.promote_step{token, base_url, team_id, project, to, wait, poll,
-- ...step fields} -> a pb.step spec
function M.promote_step(o)
  return job_step("promote", o, "vercel.promote_step")
end

-- vercel.rollback_step{... as promote_step, description_text} -> a pb.step spec
function M.rollback_step(o)
  return job_step("rollback", o, "vercel.rollback_step")
end

-- vercel.alias_step{token, base_url, team_id, project, to, alias} -> a
-- pb.step spec pointing the alias(es) at `to`; undo points each alias back
-- at the deployment it had before (a new alias is removed)
function M.alias_step(o)
  local known = { alias = true }
  for k in pairs(STEP_OPTS) do known[k] = true end
  local spec = base_spec(o, known, "vercel.alias_step")
  if o.alias == nil then error("vercel.alias_step: alias is required", 2) end
  local function aliases(ctx)
    local a = resolve(o.alias, ctx)
    if type(a) == "string" then return { a } end
    return a
  end

  spec.run = function(ctx)
    local c <close> = step_client(o, ctx)
    local project = resolve(o.project, ctx)
    local target = target_of(o, ctx, c, project, nil)
    local moved = {}
    local result = { project = project, to = target.id, aliases = moved }
    for _, a in ipairs(aliases(ctx)) do
      local r = c:alias(target.id, a)
      moved[#moved + 1] = { alias = a, previous = r.previous, changed = r.changed }
      ctx.log("vercel: alias %s -> %s%s", a, target.id,
              r.changed and (" (was " .. tostring(r.previous or "new") .. ")") or " (already)")
    end
    return result
  end

  spec.undo = function(ctx)
    local res = ctx.results[ctx.step]
    if type(res) ~= "table" then return end
    local c <close> = step_client(o, ctx)
    for i = #res.aliases, 1, -1 do
      local a = res.aliases[i]
      if a.changed then
        if a.previous then
          c:alias(a.previous, a.alias)
          ctx.log("vercel: alias %s back to %s", a.alias, a.previous)
        else
          c:remove_alias(a.alias)
          ctx.log("vercel: alias %s removed (it was new)", a.alias)
        end
      end
    end
  end

  spec.plan = function(ctx)
    local c <close> = step_client(o, ctx)
    local project = resolve(o.project, ctx)
    local target = target_of(o, ctx, c, project, nil)
    local out = {}
    for _, a in ipairs(aliases(ctx)) do
      local now = c:alias_target(a)
      if now == target.id then
        out[#out + 1] = format("nothing for %s: already on %s", a, target.id)
      else
        out[#out + 1] = format("would point %s at %s (now %s)", a, describe(target),
          now or "unassigned")
      end
    end
    return out
  end
  return spec
end

M.Client = Client
return M
