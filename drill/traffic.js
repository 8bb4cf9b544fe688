'use strict';
// The drill's traffic: what users and the rest of the system do while a
// rollback runs.
//  - Producer: every JOB_INTERVAL_MS adds a job to the next queue of
//    QUEUE_NAMES (round robin) and records its id in drill:produced:<queue>.
//    While the Redis key drill:producer:paused exists it adds nothing, so a
//    test can stop production and wait for the workers to drain.
//  - Requests: every HTTP_INTERVAL_MS reads a work order or a message from
//    APP_URL; results are counted in the Redis hash drill:traffic
//    (ok, client_error, server_error, unreachable).
//
// env: REDIS_URL, QUEUE_NAMES, APP_URL, READY_FILE, JOB_INTERVAL_MS (300),
// HTTP_INTERVAL_MS (200), MAX_WORK_ORDER_ID (2400), MAX_MESSAGE_ID (4800).
const fs = require('fs');
const http = require('http');
const Redis = require('ioredis');
const { Queue } = require('bullmq');

const url = process.env.REDIS_URL;
const names = (process.env.QUEUE_NAMES || '').split(',').map((s) => s.trim()).filter(Boolean);
const appUrl = process.env.APP_URL;
const jobEvery = Number(process.env.JOB_INTERVAL_MS || 300);
const httpEvery = Number(process.env.HTTP_INTERVAL_MS || 200);
const maxWo = Number(process.env.MAX_WORK_ORDER_ID || 2400);
const maxMsg = Number(process.env.MAX_MESSAGE_ID || 4800);
if (!url || !names.length) {
  console.error('traffic.js: REDIS_URL and QUEUE_NAMES are required');
  process.exit(2);
}

const log = (msg) => process.stdout.write(`${new Date().toISOString()} traffic[${process.pid}] ${msg}\n`);
const connection = new Redis(url, { maxRetriesPerRequest: null });
const redis = new Redis(url, { maxRetriesPerRequest: 1 });
connection.on('error', () => {});
redis.on('error', () => {});

const jobOptions = { removeOnComplete: { count: 1000 }, removeOnFail: { count: 1000 }, attempts: 3 };
const queues = names.map((name) => new Queue(name, { connection, defaultJobOptions: jobOptions }));
const JOBS = {
  notifications: ['send-push', 'send-email'],
  'photo-processing': ['generate-thumbnail'],
};

let n = 0;
let producing = false;
async function produce() {
  if (producing) return;
  producing = true;
  try {
    if (await redis.exists('drill:producer:paused')) return;
    const q = queues[n % queues.length];
    const kinds = JOBS[q.name] || ['job'];
    const kind = kinds[n % kinds.length];
    n++;
    const wo = 1 + ((n * 37) % maxWo);
    const job = await q.add(kind, { workOrderId: wo, userId: 1 + (n % 360), seq: n });
    await redis.sadd(`drill:produced:${q.name}`, job.id);
  } catch (e) {
    log(`producer: ${e.message}`);
  } finally {
    producing = false;
  }
}

let reqs = 0;
function request() {
  if (!appUrl) return;
  reqs++;
  const path = reqs % 2
    ? `/api/work-orders/${1 + ((reqs * 7) % maxWo)}`
    : `/api/messages/${1 + ((reqs * 13) % maxMsg)}`;
  const req = http.get(appUrl + path, { timeout: 1500 }, (res) => {
    res.resume();
    const field = res.statusCode >= 500 ? 'server_error' : res.statusCode >= 400 ? 'client_error' : 'ok';
    redis.hincrby('drill:traffic', field, 1).catch(() => {});
  });
  req.on('timeout', () => req.destroy(new Error('timeout')));
  req.on('error', () => { redis.hincrby('drill:traffic', 'unreachable', 1).catch(() => {}); });
}

Promise.all(queues.map((q) => q.waitUntilReady())).then(() => {
  log(`producing into ${names.join(', ')} every ${jobEvery} ms; requests to ${appUrl} every ${httpEvery} ms`);
  setInterval(produce, jobEvery);
  setInterval(request, httpEvery);
  produce();
  if (process.env.READY_FILE) {
    fs.writeFileSync(process.env.READY_FILE, JSON.stringify({ pid: process.pid }) + '\n');
  }
}, (e) => {
  log(`cannot start: ${e.message}`);
  process.exit(1);
});

function shutdown(sig) {
  log(`${sig}: stopping`);
  Promise.allSettled(queues.map((q) => q.close())).finally(() => {
    redis.disconnect();
    connection.disconnect();
    process.exit(0);
  });
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
