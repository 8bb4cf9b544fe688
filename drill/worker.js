'use strict';
// The drill's queue worker: one BullMQ Worker per queue in QUEUE_NAMES,
// processing jobs as they come.  Every processed job id is added to the
// Redis set drill:processed:<queue>; a job id seen twice increments
// drill:duplicates:<queue>, so a test can prove exactly-once processing
// across pauses, resumes and rollbacks.
//
// env: REDIS_URL, QUEUE_NAMES (comma list), READY_FILE (written once the
// workers are connected: {"pid": ...}), WORKER_CONCURRENCY (default 4).
// SIGTERM/SIGINT close the workers gracefully (active jobs finish).
const fs = require('fs');
const Redis = require('ioredis');
const { Worker } = require('bullmq');

const url = process.env.REDIS_URL;
const names = (process.env.QUEUE_NAMES || '').split(',').map((s) => s.trim()).filter(Boolean);
const concurrency = Number(process.env.WORKER_CONCURRENCY || 4);
if (!url || !names.length) {
  console.error('worker.js: REDIS_URL and QUEUE_NAMES are required');
  process.exit(2);
}

const log = (msg) => process.stdout.write(`${new Date().toISOString()} worker[${process.pid}] ${msg}\n`);
const connection = new Redis(url, { maxRetriesPerRequest: null });
const record = new Redis(url, { maxRetriesPerRequest: null });
connection.on('error', () => {});
record.on('error', () => {});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const workers = names.map((name) => {
  const w = new Worker(name, async (job) => {
    await sleep(10 + (Number(job.id) % 5) * 10);
    const added = await record.sadd(`drill:processed:${name}`, job.id);
    if (!added) {
      await record.incr(`drill:duplicates:${name}`);
      log(`duplicate: ${name} job ${job.id} processed again`);
    }
    return { processed_by: process.pid };
  }, { connection, concurrency });
  w.on('failed', (job, err) => log(`${name} job ${job && job.id} failed: ${err.message}`));
  w.on('error', (err) => log(`${name} worker error: ${err.message}`));
  return w;
});

Promise.all(workers.map((w) => w.waitUntilReady())).then(() => {
  log(`processing ${names.join(', ')} (concurrency ${concurrency})`);
  if (process.env.READY_FILE) {
    fs.writeFileSync(process.env.READY_FILE, JSON.stringify({ pid: process.pid }) + '\n');
  }
}, (e) => {
  log(`cannot start: ${e.message}`);
  process.exit(1);
});

let closing = false;
function shutdown(sig) {
  if (closing) return;
  closing = true;
  log(`${sig}: closing workers`);
  Promise.allSettled(workers.map((w) => w.close())).finally(() => {
    record.disconnect();
    connection.disconnect();
    process.exit(0);
  });
  setTimeout(() => process.exit(0), 4000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
