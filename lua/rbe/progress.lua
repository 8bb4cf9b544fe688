-- rbe.progress: what a run shows while it runs.  Three renderers of the
-- runner's events:
--   tty   (stderr is a terminal) a live line per running step with a
--         spinner, step counter, elapsed and budget used; finished steps
--         stay as one line each;
--   plain (not a terminal) timestamped lines, plus a heartbeat every 10 s
--         for a long step;
--   json  (--json) one JSON event per line on stdout, the first a version
--         record.
-- -q keeps only failures and the summary; NO_COLOR / --no-color drop colour.
local rbe = require "rbe"
local cjson = require "cjson"
local journal = require "rbe.journal"

local M = {}

local SPIN = { "|", "/", "-", "\\" }

local function fmt_dur(s)
  if not s then return "" end
  if s < 1 then return ("%dms"):format(math.floor(s * 1000 + 0.5)) end
  if s < 60 then return ("%.1fs"):format(s) end
  if s < 3600 then return ("%dm%02ds"):format(s // 60, math.floor(s % 60)) end
  return ("%dh%02dm"):format(s // 3600, math.floor(s % 3600) // 60)
end
M.fmt_dur = fmt_dur

local COLORS = { ok = "32", skipped = "36", failed = "31", undone = "33",
                 cancelled = "33", warn = "33", undo_failed = "31;1",
                 interrupted = "33", dim = "2" }

local Progress = {}
Progress.__index = Progress

-- progress.new{mode = "tty"|"plain"|"json", quiet, color, out, budget}
function M.new(opts)
  local p = setmetatable({
    mode = opts.mode, quiet = opts.quiet, verbose = opts.verbose,
    color = opts.color, err = io.stderr, out = io.stdout,
    running = {}, order = {}, drawn = 0, t0 = rbe.now(),
    budget = opts.budget, total = 0, mask = opts.mask,
  }, Progress)
  return p
end

-- Pick the renderer from the options and the terminal.
function M.choose(opts)
  local mode = opts.json and "json" or (rbe.isatty(2) and "tty" or "plain")
  local color = mode == "tty" and not opts.no_color and os.getenv("NO_COLOR") == nil
  return M.new { mode = mode, quiet = opts.quiet, verbose = opts.verbose,
                 color = color, budget = opts.budget, mask = opts.mask }
end

function Progress:paint(kind, s)
  if not self.color or not COLORS[kind] then return s end
  return "\27[" .. COLORS[kind] .. "m" .. s .. "\27[0m"
end

function Progress:masked(s)
  s = tostring(s)
  return self.mask and self.mask(s) or s
end

local function one_line(s)
  s = tostring(s or "")
  local first = s:match("^[^\n]*")
  return first ~= s and (first .. " ...") or first
end

-- lines above the live region (tty) or plain lines
function Progress:line(s)
  if self.mode == "tty" then
    self:clear_live()
    self.err:write(s, "\n")
    self:draw_live()
  else
    self.err:write(os.date("%H:%M:%S "), s, "\n")
  end
  self.err:flush()
end

function Progress:clear_live()
  if self.drawn > 0 then
    self.err:write(("\27[%dA\27[J"):format(self.drawn))
    self.drawn = 0
  end
end

function Progress:budget_text()
  local el = rbe.now() - self.t0
  if self.budget then
    return ("%s / %s budget"):format(fmt_dur(el), fmt_dur(self.budget))
  end
  return fmt_dur(el)
end

function Progress:draw_live()
  if self.mode ~= "tty" then return end
  local n = 0
  local spin = SPIN[(math.floor(rbe.now() * 10) % #SPIN) + 1]
  for _, name in ipairs(self.order) do
    local r = self.running[name]
    if r then
      local extra = r.info and ("  " .. r.info) or ""
      self.err:write(("%s [%d/%d] %s  %s%s\27[K\n"):format(
        self:paint("dim", spin), r.index, self.total, name,
        fmt_dur(rbe.now() - r.start), extra))
      n = n + 1
    end
  end
  if n > 0 then
    self.err:write(self:paint("dim", "  " .. self:budget_text()), "\27[K\n")
    n = n + 1
  end
  self.drawn = n
  self.err:flush()
end

-- Called by the ticker task: redraw the spinner, or the plain heartbeat.
function Progress:tick()
  if self.mode == "tty" then
    self:clear_live()
    self:draw_live()
  elseif self.mode == "plain" then
    local now = rbe.now()
    for _, name in ipairs(self.order) do
      local r = self.running[name]
      if r and now - r.last_beat >= 10 then
        r.last_beat = now
        self:line(("[%d/%d] %s still running (%s)%s"):format(r.index, self.total,
          name, fmt_dur(now - r.start), r.info and (", " .. r.info) or ""))
      end
    end
  end
end

-- Start the ticker: returns the task (cancel it at the end).
function Progress:start()
  if self.mode == "json" then return nil end
  return rbe.spawn(function()
    while true do
      rbe.sleep(self.mode == "tty" and 0.1 or 1)
      self:tick()
    end
  end)
end

function Progress:finish()
  if self.mode == "tty" then self:clear_live() end
end

local function status_word(self, st)
  return self:paint(st, st)
end

-- The runner's events.
function Progress:event(ev)
  if self.mode == "json" then
    if ev.ev == "run_start" then
      self.out:write(cjson.encode({ ev = "version", rbe = rbe.version, schema = 1 }), "\n")
    end
    local ok, line = pcall(cjson.encode, journal.sanitize(ev, self.mask))
    if ok then self.out:write(line, "\n") end
    self.out:flush()
    return
  end
  local k = ev.ev
  if k == "run_start" then
    self.total = ev.total_steps or 0
    self.t0 = rbe.now()
    if not self.quiet then
      self:line(("rbe: %s %s (run %s, %d steps%s)"):format(
        ev.resumed and "resuming" or "running", ev.playbook, ev.run_id,
        self.total, ev.budget and (", budget " .. fmt_dur(ev.budget)) or ""))
    end
  elseif k == "step_start" then
    self.running[ev.step] = { index = ev.index, start = rbe.now(), last_beat = rbe.now() }
    self.order[#self.order + 1] = ev.step
    if self.mode == "plain" and not self.quiet then
      self:line(("[%d/%d] %s %s"):format(ev.index, self.total, ev.kind or "step", ev.step))
    elseif self.mode == "tty" then
      self:clear_live(); self:draw_live()
    end
  elseif k == "gate_poll" then
    local r = self.running[ev.step]
    if r then r.info = ("passes %d/%d"):format(ev.streak, ev.pass) end
    if self.verbose then
      self:line(("  %s: check %s (%d/%d in a row)%s"):format(ev.step,
        ev.ok and "passed" or "failed", ev.streak, ev.pass,
        ev.error and (": " .. self:masked(one_line(ev.error))) or ""))
    end
  elseif k == "step_attempt_failed" then
    if not self.quiet then
      self:line(("  %s: attempt %d failed: %s; retrying in %s"):format(ev.step,
        ev.attempt, self:masked(one_line(ev.error)), fmt_dur(ev.retry_in)))
    end
  elseif k == "step_end" or k == "step_skip" then
    local r = self.running[ev.step]
    self.running[ev.step] = nil
    for i, n in ipairs(self.order) do
      if n == ev.step then table.remove(self.order, i) break end
    end
    local st = ev.status or "skipped"
    if self.quiet and st ~= "failed" then return end
    local idx = r and r.index or ev.index or 0
    local tail = ev.reason and ("  (" .. ev.reason .. ")") or ""
    if ev.error then tail = tail .. "  " .. self:masked(one_line(ev.error)) end
    local attempts = (ev.attempts or 1) > 1 and ("  " .. ev.attempts .. " attempts") or ""
    self:line(("[%d/%d] %-9s %s  %s%s%s"):format(idx, self.total,
      status_word(self, st), ev.step, fmt_dur(ev.duration), attempts, tail))
  elseif k == "undo_start" then
    if not self.quiet then self:line(("undo  %s ..."):format(ev.step)) end
  elseif k == "undo_end" then
    self:line(("undo  %-9s %s  %s%s"):format(status_word(self, ev.status == "ok" and "undone" or "undo_failed"),
      ev.step, fmt_dur(ev.duration), ev.error and ("  " .. self:masked(one_line(ev.error))) or ""))
  elseif k == "manual_confirm" then
    if not self.quiet then
      self:line(("  %s: confirmed by %s%s"):format(ev.step, ev.by, ev.auto and " (--yes)" or ""))
    end
  elseif k == "warn" then
    self:line(self:paint("warn", "warning: ") .. self:masked(ev.message))
  elseif k == "interrupted" then
    self:line(self:paint("interrupted", "interrupted") .. (ev.step and (" during " .. ev.step) or ""))
  elseif k == "log" then
    if not self.quiet then self:line(("  %s: %s"):format(ev.step or "", self:masked(ev.message))) end
  end
end

-- Ask the operator on the terminal; returns the answer line (nil at EOF).
function Progress:ask(question)
  self:clear_live()
  self.err:write(question)
  self.err:flush()
  local answer = rbe.read_line()
  self:draw_live()
  return answer
end

return M
