-- rbe.playbook: the playbook language and loader.  A playbook is a Lua file
-- returning a tree built with this module:
--
--   local pb = require "rbe.playbook"
--   return pb.playbook "phase 2" { budget = "15m", vars = {...},
--     pb.phase "application" { budget = "5m",
--       pb.step "pause queues" { run = fn, undo = fn, retries = 2 },
--       pb.parallel { limit = 4, pb.step "a" {...}, pb.step "b" {...} },
--     },
--     pb.manual "post in the incident channel",
--     pb.gate "healthy" { check = fn, every = "5s", pass = 3, within = "2m" },
--   }
--
-- Every constructor records where it was written (file:line) so a typo is
-- reported there, before anything runs.  Running lives in rbe.runner; this
-- module also offers the small API the REPL uses (load, steps, run_one,
-- undo_one, plan_text).
local rbe = require "rbe"
local fs = require "rbe.fs"

local type, pairs, ipairs, error, tostring, setmetatable, getmetatable =
  type, pairs, ipairs, error, tostring, setmetatable, getmetatable

local M = {}

-- exit codes of the playbook commands (`rbe help exit-codes`)
M.EXIT = require("rbe.pbload").EXIT

local NODE = {}      -- metatable of every node
local PENDING = {}   -- metatable of `pb.step "name"` before its body

local FIELDS = {
  playbook = { budget = 1, budget_mode = 1, vars = 1, on_failure = 1,
               description = 1, owner = 1, trigger = 1, notify = 1 },
  phase = { budget = 1, budget_mode = 1, description = 1 },
  parallel = { limit = 1, name = 1 },
  step = { run = "function", undo = "function", check = "function",
           plan = "function", when = "function", timeout = "duration",
           undo_timeout = "duration", retries = "integer",
           backoff = "duration", idempotent = "boolean", confirm = "string",
           on_failure = "policy", pg_tx = 1, description = "string" },
  gate = { check = "function", every = "duration", pass = "integer",
           within = "duration", when = "function", plan = "function",
           description = "string" },
  manual = { text = "string", when = "function", description = "string" },
}
local POLICIES = { undo = true, stop = true, continue = true }
local VAR_FIELDS = { default = 1, required = 1, secret = 1, env = 1, doc = 1,
                     description = 1 }

---------------------------------------------------------------------------
-- errors

-- A playbook error: exit code 2, with the place it was written.
local function perror(where, fmt, ...)
  local msg = fmt:format(...)
  local e = rbe.error("playbook", (where and (where .. ": ") or "") .. msg)
  e.where = where
  error(e, 0)
end
M.perror = perror

local function where(level)
  local info = debug.getinfo(level + 1, "Sl")
  if not info then return "?" end
  local src = info.source:sub(1, 1) == "@" and info.source:sub(2) or info.short_src
  return src .. ":" .. (info.currentline or 0)
end

local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

local function suggest(word, known)
  local best, bd = nil, 3
  for k in pairs(known) do
    local d = distance(word, k)
    if d < bd then best, bd = k, d end
  end
  return best and (" (did you mean '" .. best .. "'?)") or ""
end

---------------------------------------------------------------------------
-- constructors

local function what(node)
  return node.name and (node.kind .. " '" .. node.name .. "'") or node.kind
end

local function check_value(node, k, v, want)
  local function bad(expect)
    perror(node.where, "%s: field '%s' must be %s, got %s", what(node), k,
           expect, type(v))
  end
  if want == "function" then
    local mt = getmetatable(v)
    if type(v) ~= "function" and not (mt and mt.__call) then bad("a function") end
  elseif want == "duration" then
    local ok, err = pcall(rbe.duration, v)
    if not ok then
      perror(node.where, "%s: field '%s': %s", what(node), k,
             tostring(err):gsub("^.-: ", ""))
    end
  elseif want == "integer" then
    if math.type(v) ~= "integer" or v < 0 then bad("a non-negative integer") end
  elseif want == "boolean" then
    if type(v) ~= "boolean" then bad("true or false") end
  elseif want == "string" then
    if type(v) ~= "string" then bad("a string") end
  elseif want == "policy" then
    if not POLICIES[v] then
      perror(node.where, "%s: on_failure must be \"undo\", \"stop\" or "
             .. "\"continue\", got %s", what(node), tostring(v))
    end
  end
end

local function child_node(parent, v, i)
  if getmetatable(v) == PENDING then
    if v.kind == "manual" then
      return setmetatable({ kind = "manual", name = v.name, where = v.where,
                            text = v.name }, NODE)
    end
    perror(v.where, "%s '%s' has no body: write pb.%s \"%s\" { ... }",
           v.kind, v.name, v.kind, v.name)
  end
  if getmetatable(v) ~= NODE then
    perror(parent.where, "%s: item %d is a %s, not a step, phase, parallel "
           .. "group, gate or manual step", what(parent), i, type(v))
  end
  if v.kind == "playbook" then
    perror(v.where, "a playbook cannot be nested inside %s", what(parent))
  end
  return v
end

-- Build a node of `kind` from the spec table: named fields are checked
-- against FIELDS[kind]; the array part holds the children.
local function build(kind, name, spec, loc)
  if type(spec) ~= "table" then
    perror(loc, "%s%s: expected a table { ... }, got %s", kind,
           name and (" '" .. name .. "'") or "", type(spec))
  end
  local node = setmetatable({ kind = kind, name = name, where = loc,
                              children = {} }, NODE)
  local known = FIELDS[kind]
  for k, v in pairs(spec) do
    if type(k) == "string" then
      if not known[k] then
        perror(loc, "%s: unknown field '%s'%s", what(node), k, suggest(k, known))
      end
      check_value(node, k, v, known[k])
      node[k] = v
    elseif math.type(k) ~= "integer" then
      perror(loc, "%s: unexpected key of type %s", what(node), type(k))
    end
  end
  for i = 1, #spec do node.children[i] = child_node(node, spec[i], i) end
  return node
end

local function named(kind)
  return function(name)
    local loc = where(2)
    if type(name) ~= "string" or name == "" then
      perror(loc, "pb.%s: a name string expected, as in pb.%s \"name\" { ... }",
             kind, kind)
    end
    return setmetatable({ kind = kind, name = name, where = loc }, {
      __index = PENDING.__index,
      __call = function(_, spec)
        local node = build(kind, name, spec, loc)
        if (kind == "step") and not node.run then
          perror(loc, "step '%s' has no run function", name)
        end
        if kind == "gate" and not node.check then
          perror(loc, "gate '%s' has no check function", name)
        end
        if kind == "step" or kind == "gate" or kind == "manual" then
          if #node.children > 0 then
            perror(loc, "%s '%s' cannot contain other steps", kind, name)
          end
        end
        return node
      end,
      __metatable = PENDING,
    })
  end
end

-- The pending object of `pb.step "x"` must be recognisable: give it the
-- PENDING metatable through __metatable (what getmetatable returns).
PENDING.__index = PENDING

M.step = named("step")
M.phase = named("phase")
M.gate = named("gate")
M.manual = named("manual")

function M.parallel(spec)
  local node = build("parallel", nil, spec, where(2))
  if node.limit ~= nil and (math.type(node.limit) ~= "integer" or node.limit < 1) then
    perror(node.where, "parallel: limit must be a positive integer")
  end
  node.name = spec.name
  return node
end

function M.playbook(name)
  local loc = where(2)
  if type(name) ~= "string" then
    perror(loc, "pb.playbook: a name string expected")
  end
  return function(spec)
    local node = build("playbook", name, spec, loc)
    return node
  end
end

---------------------------------------------------------------------------
-- validation of the whole tree

local function validate(root)
  local seen, order, all = {}, {}, {}
  local function visit(node, parent)
    node.parent = parent
    all[#all + 1] = node
    if node.name and node.kind ~= "parallel" then
      local prev = seen[node.name]
      if prev then
        perror(node.where, "duplicate name '%s' (also %s at %s)", node.name,
               prev.kind, prev.where)
      end
      seen[node.name] = node
    end
    if node.kind == "step" or node.kind == "gate" or node.kind == "manual" then
      order[#order + 1] = node
    end
    for _, c in ipairs(node.children or {}) do visit(c, node) end
  end
  visit(root, nil)
  if #order == 0 then perror(root.where, "playbook '%s' has no steps", root.name) end
  -- vars declarations
  for k, decl in pairs(root.vars or {}) do
    if type(k) ~= "string" then perror(root.where, "vars: names must be strings") end
    if type(decl) == "table" then
      for f in pairs(decl) do
        if not VAR_FIELDS[f] then
          perror(root.where, "var '%s': unknown field '%s'%s", k, tostring(f),
                 suggest(tostring(f), VAR_FIELDS))
        end
      end
    end
  end
  return seen, order, all
end

---------------------------------------------------------------------------
-- loading

local Book = {}
Book.__index = Book

-- pb.load(path[, {vars = {k = v}}]) -> book; raises a playbook error
function M.load(path, opts)
  if type(path) ~= "string" then error("pb.load: path expected", 2) end
  local root, text = require("rbe.pbload").load_chunk(path)
  if getmetatable(root) ~= NODE or root.kind ~= "playbook" then
    return nil, root   -- not a playbook: a plain script, already run
  end
  return M.from_root(root, path, text, opts)
end

-- The book of a playbook tree the file at `path` (whose text is `text`)
-- returned: validated, vars resolved.
function M.from_root(root, path, text, opts)
  opts = opts or {}
  local byname, order, all = validate(root)
  local book = setmetatable({
    root = root, path = path, name = root.name, sha256 = rbe.sha256(text),
    byname = byname, order = order, all = all, text = text,
  }, Book)
  book.vars = M.resolve_vars(book, opts.vars or {}, opts.var_files, opts.env)
  return book
end

function M.is_playbook(v)
  return getmetatable(v) == NODE and v.kind == "playbook"
end

-- book:steps() -> { {name, kind, undo, where}, ... } in playbook order
function Book:steps()
  local out = {}
  for i, n in ipairs(self.order) do
    out[i] = { name = n.name, kind = n.kind, undo = n.undo ~= nil, where = n.where }
  end
  return out
end

---------------------------------------------------------------------------
-- variables

local function read_var_file(path)
  local ok, text = pcall(fs.read, path)
  if not ok then perror(nil, "--var-file %s: %s", path, tostring(text.message or text)) end
  local out, n = {}, 0
  for line in (text .. "\n"):gmatch("(.-)\r?\n") do
    n = n + 1
    if not line:match("^%s*$") and not line:match("^%s*#") then
      local k, v = line:match("^%s*([%w_]+)%s*=%s*(.-)%s*$")
      if not k then perror(path .. ":" .. n, "expected name=value") end
      v = v:match('^"(.*)"$') or v:match("^'(.*)'$") or v
      out[k] = v
    end
  end
  return out
end

-- Resolve declared vars from (highest first) --var, --var-file, the
-- environment and defaults.  Unknown --var names and missing required
-- vars are playbook errors.  Secret values become rbe.secret values.
function M.resolve_vars(book, cli, files, env)
  local decls = book.root.vars or {}
  local from_files = {}
  for _, f in ipairs(files or {}) do
    for k, v in pairs(read_var_file(f)) do from_files[k] = v end
  end
  for k in pairs(cli) do
    if decls[k] == nil then
      local known = {}
      for d in pairs(decls) do known[d] = 1 end
      perror(nil, "unknown --var '%s' (playbook %s declares: %s)%s", k, book.path,
             next(known) and table.concat((function()
               local t = {} for d in pairs(known) do t[#t + 1] = d end
               table.sort(t) return t end)(), ", ") or "no vars",
             suggest(k, known))
    end
  end
  for k in pairs(from_files) do
    if decls[k] == nil then perror(nil, "--var-file: unknown var '%s'", k) end
  end
  local values, secret = {}, {}
  for k, d in pairs(decls) do
    local decl = type(d) == "table" and d or { default = d }
    local v = cli[k]
    if v == nil then v = from_files[k] end
    if v == nil and decl.env then v = (env or os.getenv)(decl.env) end
    if v == nil then v = decl.default end
    if v == nil and decl.required then
      perror(nil, "missing required var '%s'%s: pass --var %s=...", k,
             decl.env and (" (or set $" .. decl.env .. ")") or "", k)
    end
    if decl.secret and v ~= nil then
      v = rbe.secret(v)
      secret[k] = true
    end
    values[k] = v
  end
  book.secret_vars = secret
  return values
end

-- Vars as they may be printed or journaled: secrets as "***".
function M.display_vars(book)
  local out = {}
  for k, v in pairs(book.vars or {}) do
    out[k] = rbe.is_secret(v) and "***" or v
  end
  return out
end

---------------------------------------------------------------------------
-- the REPL's small API (runs through the runner)

function M.run_one(book, name, opts)
  return require("rbe.runner").run_one(book, name, opts or {})
end

function M.undo_one(book, name, opts)
  return require("rbe.runner").undo_one(book, name, opts or {})
end

function M.plan_text(book, opts)
  return require("rbe.runner").plan_text(book, opts or {})
end

M.NODE = NODE
return M
