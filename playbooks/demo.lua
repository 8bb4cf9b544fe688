-- playbooks/demo.lua: `make demo` runs this with `rbe run`.  A small
-- rollback drill on processes and files only (a later drill runs against
-- a throwaway PostgreSQL/Redis/app stack).  The first phase builds a fake
-- app with a good v1 and a bad v2 deployed; the rest rolls back the way a
-- runbook would: independent steps in parallel, a timeout on every wait, a
-- flaky step retried, undo for each change, a health gate that must pass
-- three times in a row, and a journal plus report at the end.
local pb = require "rbe.playbook"
local proc = require "rbe.proc"
local fs = require "rbe.fs"

local function git(ctx, ...)
  return proc.run({ "git", ... }, { cwd = ctx.results["prepare drill"], timeout = "10s",
    env = { GIT_AUTHOR_NAME = "rbe", GIT_AUTHOR_EMAIL = "rbe@localhost",
            GIT_COMMITTER_NAME = "rbe", GIT_COMMITTER_EMAIL = "rbe@localhost" } })
end

local function app(ctx, f) return ctx.results["prepare drill"] .. "/" .. f end

return pb.playbook "demo: roll the app back from v2 to v1" {
  budget = "1m",
  vars = { fail_at = { default = "", doc = "name of a step to break, to watch the undo" } },

  pb.phase "drill setup" { budget = "20s",
    pb.step "prepare drill" {
      run = function(ctx)
        local dir = fs.tmpdir("rbe-demo-")
        proc.run({ "git", "init", "-q", dir }, { timeout = "10s" })
        ctx.results["prepare drill"] = dir
        fs.write(dir .. "/VERSION", "v1\n")
        git(ctx, "add", "VERSION"); git(ctx, "commit", "-qm", "v1"); git(ctx, "tag", "v1")
        fs.write(dir .. "/VERSION", "v2\n")
        git(ctx, "commit", "-qam", "v2 (bad)"); git(ctx, "tag", "v2")
        fs.write(dir .. "/workers", "running\n")
        return dir
      end,
      undo = function(ctx) fs.remove(ctx.results["prepare drill"], { recursive = true }) end,
    },
  },

  pb.phase "application rollback" { budget = "30s",
    pb.parallel { limit = 2,
      pb.step "pause workers" {
        run = function(ctx) rbe.sleep("200ms"); fs.write(app(ctx, "workers"), "paused\n") end,
        undo = function(ctx) fs.write(app(ctx, "workers"), "running\n") end,
        timeout = "5s",
      },
      pb.step "snapshot app" {
        run = function(ctx)
          local out = ctx.run_dir .. "/app-snapshot.tgz"
          proc.run({ "tar", "-C", app(ctx, ""), "--exclude=.git", "-czf", out, "." }, { timeout = "30s" })
          return out
        end,
        plan = function() return "would tar the app directory into the run directory" end,
      },
    },
    pb.step "deploy API (flaky)" {
      retries = 2, backoff = "100ms", timeout = "2s",
      run = function(ctx)
        local n = (ctx.results.flaky_attempts or 0) + 1
        ctx.results.flaky_attempts = n
        if n == 1 then error(rbe.error("http", "503 Service Unavailable (drill)", { retryable = true })) end
        if ctx.vars.fail_at == "deploy API (flaky)" then error("broken on purpose (--var fail_at)") end
      end,
    },
    pb.step "git checkout v1" {
      run = function(ctx) git(ctx, "checkout", "-q", "v1") end,
      undo = function(ctx) git(ctx, "checkout", "-q", "v2") end,
      plan = function() return "would check out tag v1 (undo: v2)" end,
    },
  },

  pb.gate "v1 answers" {
    every = "50ms", pass = 3, within = "5s",
    check = function(ctx) return fs.read(app(ctx, "VERSION")) == "v1\n" end,
  },

  pb.step "resume workers" {
    run = function(ctx)
      if ctx.vars.fail_at == "resume workers" then error("broken on purpose (--var fail_at)") end
      fs.write(app(ctx, "workers"), "running\n")
    end,
  },

  pb.step "clean up drill" {
    run = function(ctx) fs.remove(ctx.results["prepare drill"], { recursive = true }) end,
  },
}
