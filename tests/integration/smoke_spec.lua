-- The throwaway servers of tests/fixtures answer: later issues' specs
-- (rbe.pg, rbe.redis) rely on them.  Checked with the servers' own
-- clients, run through rbe.proc.
local rbe = require "rbe"
local proc = require "rbe.proc"

describe("#pg #redis fixtures", function()
  it("export the server URLs", function()
    assert.truthy(rbe.env("RBE_TEST_PG_URL"):match("^postgresql://rbe:[^@]+@127%.0%.0%.1:%d+/rbe_test$"))
    assert.truthy(rbe.env("RBE_TEST_REDIS_URL"):match("^redis://127%.0%.0%.1:%d+/0$"))
  end)

  it("PostgreSQL answers on 127.0.0.1 (pg_isready, psql)", function()
    local port = rbe.env("RBE_TEST_PG_PORT")
    local bindir = rbe.env("RBE_TEST_PG_BINDIR", "/usr/lib/postgresql/15/bin")
    local r = proc.run({ bindir .. "/pg_isready", "-h", "127.0.0.1", "-p", port }, { timeout = "10s" })
    assert.are.equal(0, r.code)
    assert.truthy(r.stdout:find("accepting connections", 1, true))
    local q = proc.run({ "psql", rbe.env("RBE_TEST_PG_URL"), "-Atc", "select 40 + 2" }, { timeout = "10s" })
    assert.are.equal("42\n", q.stdout)
  end)

  it("Redis answers PING on 127.0.0.1", function()
    local r = proc.run({ "redis-cli", "-h", "127.0.0.1", "-p", rbe.env("RBE_TEST_REDIS_PORT"), "ping" },
      { timeout = "10s" })
    assert.are.equal("PONG\n", r.stdout)
  end)
end)
