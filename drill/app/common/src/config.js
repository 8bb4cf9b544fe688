'use strict';
// Reads the app's .env (KEY=VALUE lines, # comments, optional quotes) from
// the app's root directory.  The .env file wins over the process
// environment, so what a restart runs with is what the file says.
const fs = require('fs');
const path = require('path');

function parse(text) {
  const out = {};
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = /^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$/.exec(line);
    if (!m) continue;
    let v = m[2];
    if ((v.startsWith('"') && v.endsWith('"')) || (v.startsWith("'") && v.endsWith("'"))) {
      v = v.slice(1, -1);
    }
    out[m[1]] = v;
  }
  return out;
}

function load() {
  const root = path.resolve(__dirname, '..');
  const file = path.join(root, '.env');
  let values = {};
  try {
    values = parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    if (e.code !== 'ENOENT') throw e;
  }
  const cfg = Object.assign({}, process.env, values);
  cfg.ROOT = root;
  cfg.ENV_FILE = file;
  return cfg;
}

module.exports = { load, parse };
