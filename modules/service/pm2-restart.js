// modules/service/pm2-restart.js PM2_BIN NAME [--update-env]
//
// Restarts the pm2 process NAME through pm2's programmatic API
// (connect, restart, describe, disconnect) and prints its entries as one
// JSON line: one Node start-up, where `pm2 restart` then `pm2 jlist` are
// two.  rbe's service module runs it and falls back to the CLI when it
// exits 5.  Only the fields rbe reports are printed: a process's pm2_env
// also holds the app's environment (secrets).
//
// Exit codes: 0 done, 4 no such process, 5 pm2's package not found from
// PM2_BIN (use the CLI), 1 anything else (message on stderr).
'use strict';
const fs = require('fs');
const path = require('path');

const [bin, name, flag] = process.argv.slice(2);

function fail(code, msg) {
  process.stderr.write(String(msg) + '\n');
  process.exit(code);
}

// the pm2 package that PM2_BIN (a path, or a name on PATH) belongs to
function packageOf(tool) {
  let file = tool;
  if (!tool.includes('/')) {
    file = (process.env.PATH || '').split(':').map((d) => path.join(d || '.', tool))
      .find((p) => fs.existsSync(p));
    if (!file) return null;
  }
  let dir;
  try { dir = path.dirname(fs.realpathSync(file)); } catch (e) { return null; }
  for (let i = 0; i < 4; i++) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8'));
      if (pkg.name === 'pm2') return dir;
    } catch (e) { /* not here: one level up */ }
    dir = path.dirname(dir);
  }
  return null;
}

if (!bin || !name) fail(1, 'usage: pm2-restart.js PM2_BIN NAME [--update-env]');
const dir = packageOf(bin);
if (!dir) fail(5, `no pm2 package found from ${bin}`);
let pm2;
try { pm2 = require(dir); } catch (e) { fail(5, `cannot load pm2 from ${dir}: ${e.message}`); }

function entry(p) {
  const env = p.pm2_env || {};
  return {
    name: p.name, pm_id: p.pm_id, pid: p.pid, monit: p.monit,
    pm2_env: {
      status: env.status, restart_time: env.restart_time,
      unstable_restarts: env.unstable_restarts, pm_uptime: env.pm_uptime,
      exec_mode: env.exec_mode, version: env.version, pm_cwd: env.pm_cwd,
    },
  };
}

pm2.connect((err) => {
  if (err) fail(1, `cannot connect to the pm2 daemon: ${err.message || err}`);
  pm2.restart(name, { updateEnv: flag === '--update-env' }, (err) => {
    if (err) {
      pm2.disconnect();
      const msg = err.message || String(err);
      fail(/not found/i.test(msg) ? 4 : 1, msg);
    }
    pm2.describe(name, (err, list) => {
      pm2.disconnect();
      if (err) fail(1, err.message || err);
      process.stdout.write(JSON.stringify((list || []).map(entry)) + '\n');
    });
  });
});
