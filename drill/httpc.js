'use strict';
// A tiny HTTP client for the drill's scripts and tests, so they need
// neither curl nor rbe.http:
//
//   node drill/httpc.js [options] METHOD URL
//     --bearer TOKEN     Authorization: Bearer TOKEN
//     --json TEXT        request body, sent as application/json
//     --wait SECONDS     retry until the server answers (any status) or the
//                        time is up; --until-status N waits for status N
//     --timeout SECONDS  per request (default 5)
//
// Prints one JSON line: {"status": N, "body": <parsed JSON or text>,
// "elapsed_ms": N}.  Exit 0 when the server answered, 1 when it did not.
const http = require('http');

const args = process.argv.slice(2);
const opt = { wait: 0, timeout: 5, untilStatus: null };
const pos = [];
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--bearer') opt.bearer = args[++i];
  else if (a === '--json') opt.json = args[++i];
  else if (a === '--wait') opt.wait = Number(args[++i]);
  else if (a === '--until-status') opt.untilStatus = Number(args[++i]);
  else if (a === '--timeout') opt.timeout = Number(args[++i]);
  else pos.push(a);
}
if (pos.length !== 2) {
  process.stderr.write('usage: node httpc.js [--bearer T] [--json BODY] [--wait S] '
    + '[--until-status N] [--timeout S] METHOD URL\n');
  process.exit(2);
}
const [method, url] = pos;
const started = Date.now();

function once() {
  return new Promise((resolve, reject) => {
    const headers = {};
    if (opt.bearer) headers.authorization = `Bearer ${opt.bearer}`;
    let body = null;
    if (opt.json !== undefined) {
      body = Buffer.from(opt.json);
      headers['content-type'] = 'application/json';
      headers['content-length'] = body.length;
    }
    const o = { method: method.toUpperCase(), headers, timeout: opt.timeout * 1000 };
    const req = http.request(url, o, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let parsed = text;
        try { parsed = text ? JSON.parse(text) : null; } catch (e) { /* text */ }
        resolve({ status: res.statusCode, body: parsed });
      });
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    if (body) req.write(body);
    req.end();
  });
}

(async () => {
  const deadline = started + opt.wait * 1000;
  let last;
  for (;;) {
    try {
      const r = await once();
      if (opt.untilStatus === null || r.status === opt.untilStatus || Date.now() >= deadline) {
        r.elapsed_ms = Date.now() - started;
        process.stdout.write(JSON.stringify(r) + '\n');
        process.exit(0);
      }
      last = new Error(`status ${r.status}`);
    } catch (e) {
      last = e;
    }
    if (Date.now() >= deadline) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  process.stderr.write(`httpc: ${method} ${url}: ${last.message}\n`);
  process.exit(1);
})();
