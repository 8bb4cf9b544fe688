'use strict';
// Build step of the drill app: copies src/ to dist/ (what pm2 runs) and
// records the version and commit it was built from in dist/build.json.
// A `git checkout` without a build leaves the old code running.
const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');

const root = __dirname;
const src = path.join(root, 'src');
const dist = path.join(root, 'dist');
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));

let commit = 'unknown';
try {
  commit = execFileSync('git', ['rev-parse', 'HEAD'], { cwd: root, encoding: 'utf8' }).trim();
} catch (e) { /* not a git checkout */ }

fs.rmSync(dist, { recursive: true, force: true });
fs.mkdirSync(dist, { recursive: true });
for (const name of fs.readdirSync(src)) {
  fs.copyFileSync(path.join(src, name), path.join(dist, name));
}
const info = { name: pkg.name, version: pkg.version, commit, builtAt: new Date().toISOString() };
fs.writeFileSync(path.join(dist, 'build.json'), JSON.stringify(info, null, 2) + '\n');
console.log(`built ${pkg.name} ${pkg.version} (${commit.slice(0, 7)}) into dist/`);
