-- Exactly-once database steps (pg_tx): the step's work and its marker row
-- commit together, and `rbe resume` trusts the marker, not a guess.
local rbe = require "rbe"
local proc = require "rbe.proc"
local fs = require "rbe.fs"
local pg = require "rbe.pg"
local cjson = require "cjson"

local RBE = require("support").rbe_bin()

describe("#pg #playbook pg_tx", function()
  local dir, admin, dbname, url

  before_each(function()
    dir = fs.tmpdir("rbe-pgtx-")
    admin = pg.connect(rbe.env("RBE_TEST_PG_ADMIN_URL"))
    dbname = "rbe_pgtx_" .. rbe.whoami().pid .. "_" .. math.random(1e6)
    admin:query("create database " .. dbname .. " owner rbe")
    url = rbe.env("RBE_TEST_PG_URL"):gsub("/rbe_test$", "/" .. dbname)
    local db <close> = pg.connect(url)
    db:exec("create table effects (id serial primary key, step text not null)")
  end)

  after_each(function()
    admin:query("drop database if exists " .. dbname .. " with (force)")
    admin:close()
    fs.remove(dir, { recursive = true })
  end)

  local function write_playbook()
    local p = dir .. "/pgtx.lua"
    fs.write(p, ([[
local pb = require "rbe.playbook"
local pg = require "rbe.pg"
local fs = require "rbe.fs"
local db
local function conn() db = db or pg.connect(%q) return db end
return pb.playbook "pg tx" {
  pb.step "backfill" { pg_tx = conn, run = function(ctx, tx)
      tx:query("insert into effects (step) values ('backfill')")
      fs.append(%q, "inside\n")
      rbe.sleep(tonumber(os.getenv("STEP_SLEEP") or "0"))
    end },
  pb.step "after" { run = function() fs.append(%q, "after\n") end },
}
]]):format(url, dir .. "/inside", dir .. "/after"))
    return p
  end

  local function effects()
    local db <close> = pg.connect(url)
    return #db:query("select 1 from effects where step = 'backfill'")
  end

  local function run(args, env)
    local argv = { RBE }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    return proc.run(argv, { cwd = dir, check = false, timeout = "60s",
      env = { RBE_STATE_DIR = dir .. "/state", STEP_SLEEP = env and env.STEP_SLEEP or "0" } })
  end

  it("killed inside the transaction: nothing committed, resume runs the step once", function()
    local p = write_playbook()
    local child = proc.spawn({ RBE, "run", p }, { cwd = dir, check = false,
      env = { RBE_STATE_DIR = dir .. "/state", STEP_SLEEP = "30" } })
    rbe.timeout("20s", function() while not fs.exists(dir .. "/inside") do rbe.sleep(0.01) end end)
    child:kill("SIGKILL")
    child:wait()
    child:close()
    -- the server notices the dead client and rolls back
    rbe.timeout("10s", function()
      while true do
        local db <close> = pg.connect(url)
        local n = db:query("select count(*) as n from pg_stat_activity where datname = $1 and state like 'idle in transaction%'", dbname)[1].n
        if n == 0 then return end
        rbe.sleep(0.05)
      end
    end)
    assert.are.equal(0, effects())
    local id = fs.list(dir .. "/state/runs")[1]
    local r = run { "resume", id }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(1, effects())
  end)

  it("committed but not journaled: resume reads the marker and does not run it again", function()
    local p = write_playbook()
    local r = run { "run", p }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(1, effects())
    -- a crash right after COMMIT: the journal stops at the step's start
    local id = fs.list(dir .. "/state/runs")[1]
    local jp = dir .. "/state/runs/" .. id .. "/journal.jsonl"
    local kept = {}
    for line in fs.read(jp):gmatch("[^\n]+") do
      kept[#kept + 1] = line
      local ev = cjson.decode(line)
      if ev.ev == "step_start" and ev.step == "backfill" then break end
    end
    fs.write(jp, table.concat(kept, "\n") .. "\n", { mode = "0600" })
    fs.remove(dir .. "/after")
    r = run { "resume", id }
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(1, effects())                 -- not twice
    assert.are.equal("after\n", fs.read(dir .. "/after"))
    local db <close> = pg.connect(url)
    assert.are.equal(1, #db:query("select 1 from rbe_steps where run_id = $1 and step = 'backfill'", id))
  end)
end)
