'use strict';
// drill-app: the field-service API that the rollback drill deploys, breaks
// and rolls back.  Plain `http`, no framework.  What differs between v1 and
// v2 lives in features.js; this file is the same in both versions.
//
//   GET  /health                 {status, api, database, redis, version, ...}
//   GET  /api/version            {version, commit, builtAt, ...}
//   GET  /api/metrics            request and error counts since start
//   GET  /api/queue/stats        BullMQ job counts per queue
//   POST /api/queue/pause-all    pause every queue (workers stop taking jobs)
//   POST /api/queue/resume-all   resume every queue
//   GET  /api/work-orders/:id    one work order (cached in Redis)
//   GET  /api/messages/:id       one message with its mediaUrl
//
// Configuration comes from the .env file next to package.json (config.js).
const http = require('http');
const fs = require('fs');
const path = require('path');
const { Pool } = require('pg');
const Redis = require('ioredis');
const { Queue } = require('bullmq');
const config = require('./config');
const features = require('./features');

const cfg = config.load();
const started = Date.now();
let build = { version: features.VERSION, commit: 'unknown', builtAt: null };
try {
  build = JSON.parse(fs.readFileSync(path.join(__dirname, 'build.json'), 'utf8'));
} catch (e) { /* running from src/ */ }

function log(level, msg) {
  const line = `${new Date().toISOString()} ${level} [drill-app ${features.VERSION}] ${msg}\n`;
  if (cfg.LOG_FILE) {
    try { fs.appendFileSync(cfg.LOG_FILE, line); } catch (e) { process.stderr.write(line); }
  }
  process.stdout.write(line);
}

const db = new Pool({
  connectionString: cfg.DATABASE_URL,
  max: 5,
  connectionTimeoutMillis: 2000,
  idleTimeoutMillis: 10000,
});
// an idle client losing its server (a restart, a terminate) must not crash us
db.on('error', (e) => log('WARN', `postgres idle client: ${e.message}`));

const redisOpts = { maxRetriesPerRequest: 1, connectTimeout: 2000, enableOfflineQueue: false };
const redis = new Redis(cfg.REDIS_URL, redisOpts);
redis.on('error', () => {});

const queueNames = (cfg.QUEUE_NAMES || '').split(',').map((s) => s.trim()).filter(Boolean);
const queueConn = new Redis(cfg.REDIS_URL, { maxRetriesPerRequest: null });
queueConn.on('error', () => {});
const queues = queueNames.map((name) => new Queue(name, { connection: queueConn }));

const metrics = { requests: 0, errors: 0, by_status: {} };
const ctx = { cfg, db, redis, log, metrics };

function withTimeout(promise, ms, what) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

async function check(fn, what) {
  try {
    await withTimeout(fn(), 1500, what);
    return { state: 'ok' };
  } catch (e) {
    return { state: 'error', error: e.message };
  }
}

async function health() {
  const [d, r] = await Promise.all([
    check(() => db.query('SELECT 1'), 'database'),
    check(() => redis.ping(), 'redis'),
  ]);
  const h = {
    status: 'ok',
    api: 'ok',
    database: d.state,
    redis: r.state,
    version: features.VERSION,
    commit: build.commit,
    uptime_s: Math.round((Date.now() - started) / 1000),
    issues: [],
  };
  if (d.error) h.issues.push(`database: ${d.error}`);
  if (r.error) h.issues.push(`redis: ${r.error}`);
  features.health(h, ctx);
  if (h.database !== 'ok' || h.redis !== 'ok') h.status = 'down';
  return h;
}

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

async function queueStats() {
  const out = {};
  await Promise.all(queues.map(async (q) => {
    const counts = await q.getJobCounts('waiting', 'active', 'completed', 'failed', 'delayed', 'paused');
    counts.is_paused = await q.isPaused();
    out[q.name] = counts;
  }));
  return out;
}

const routes = [
  ['GET', /^\/health$/, async () => {
    const h = await health();
    return [h.status === 'down' ? 503 : 200, h];
  }],
  ['GET', /^\/api\/version$/, async () => [200, {
    name: 'drill-app', version: features.VERSION, package_version: build.version,
    commit: build.commit, builtAt: build.builtAt, node: process.version,
    features: features.flags(ctx),
  }]],
  ['GET', /^\/api\/metrics$/, async () => [200, {
    requests: metrics.requests, errors: metrics.errors,
    error_rate: metrics.requests ? metrics.errors / metrics.requests : 0,
    by_status: metrics.by_status, since: new Date(started).toISOString(),
  }]],
  ['GET', /^\/api\/queue\/stats$/, async () => [200, { queues: await queueStats() }]],
  ['POST', /^\/api\/queue\/pause-all$/, async () => {
    await Promise.all(queues.map((q) => q.pause()));
    log('INFO', `paused queues: ${queueNames.join(', ')}`);
    return [200, { paused: queueNames, queues: await queueStats() }];
  }],
  ['POST', /^\/api\/queue\/resume-all$/, async () => {
    await Promise.all(queues.map((q) => q.resume()));
    log('INFO', `resumed queues: ${queueNames.join(', ')}`);
    return [200, { resumed: queueNames, queues: await queueStats() }];
  }],
  ['GET', /^\/api\/work-orders\/(\d+)$/, async (m) => {
    const id = Number(m[1]);
    const key = `cache:work_order:${id}`;
    const cached = await redis.get(key).catch(() => null);
    const wo = await features.workOrder(ctx, id, cached);
    if (!wo) return [404, { error: 'work order not found', id }];
    if (!cached) {
      redis.set(key, JSON.stringify(wo), 'EX', Number(cfg.CACHE_TTL_SECONDS || 600)).catch(() => {});
    }
    return [200, wo];
  }],
  ['GET', /^\/api\/messages\/(\d+)$/, async (m) => {
    const msg = await features.message(ctx, Number(m[1]));
    if (!msg) return [404, { error: 'message not found', id: Number(m[1]) }];
    return [200, msg];
  }],
];

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://drill-app');
  const counted = url.pathname.startsWith('/api/') && url.pathname !== '/api/metrics';
  const finish = (status, body) => {
    if (counted) {
      metrics.requests++;
      if (status >= 500) metrics.errors++;
      metrics.by_status[status] = (metrics.by_status[status] || 0) + 1;
    }
    send(res, status, body);
  };
  req.resume();
  for (const [method, re, handler] of routes) {
    const m = re.exec(url.pathname);
    if (!m) continue;
    if (req.method !== method) return finish(405, { error: `use ${method}` });
    handler(m).then(([status, body]) => finish(status, body), (e) => {
      log('ERROR', `${req.method} ${url.pathname} failed: ${e.message}`);
      finish(500, { error: e.message });
    });
    return;
  }
  finish(404, { error: 'not found', path: url.pathname });
});

server.listen(Number(cfg.PORT), cfg.HOST || '127.0.0.1', () => {
  log('INFO', `listening on ${cfg.HOST || '127.0.0.1'}:${cfg.PORT} (pid ${process.pid}, `
    + `package ${build.version}, commit ${String(build.commit).slice(0, 7)})`);
  features.start(ctx);
});

function shutdown(sig) {
  log('INFO', `${sig}: shutting down`);
  server.close();
  Promise.allSettled([db.end(), ...queues.map((q) => q.close())]).finally(() => {
    redis.disconnect();
    queueConn.disconnect();
    process.exit(0);
  });
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGINT', () => shutdown('SIGINT'));
process.on('SIGTERM', () => shutdown('SIGTERM'));
