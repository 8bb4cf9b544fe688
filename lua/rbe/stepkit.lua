-- rbe.stepkit: the small helpers the integration modules (modules/*.lua)
-- share to take options and build ready-made playbook steps.
local aux = require "rbe.aux"
local type, pairs, error, tostring = type, pairs, error, tostring
local format = string.format

local M = {}

-- resolve(v, ctx): an option given as function(ctx) is called at run time
function M.resolve(v, ctx)
  if type(v) == "function" then return v(ctx) end
  return v
end

-- error_for(kind) -> function(code, msg, fields) -> an error object of
-- that kind with `code`, not retryable unless fields say so
function M.error_for(kind)
  return function(code, msg, fields)
    local e = aux.error(kind, msg, fields)
    e.code = code
    if e.retryable == nil then e.retryable = false end
    return e
  end
end

-- check_fields(t, known, fname[, level]) -> t (or {} for nil); raises at
-- the caller's caller (level, default 2) for a non-table or unknown key
function M.check_fields(t, known, fname, level)
  if t == nil then return {} end
  if type(t) ~= "table" then error(fname .. ": options table expected", (level or 2) + 1) end
  for k in pairs(t) do
    if not known[k] then
      error(format("%s: unknown option '%s'", fname, tostring(k)), (level or 2) + 1)
    end
  end
  return t
end

-- base_spec(o, known, fname, step_fields) -> a step spec holding the
-- common step fields of o (timeout, retries, ...); raises at the module
-- function's caller for an unknown option
function M.base_spec(o, known, fname, step_fields)
  if type(o) ~= "table" then error(fname .. ": options table expected", 3) end
  for k in pairs(o) do
    if not known[k] and not step_fields[k] then
      error(format("%s: unknown option '%s'", fname, tostring(k)), 3)
    end
  end
  local spec = {}
  for k in pairs(step_fields) do spec[k] = o[k] end
  return spec
end

return M
