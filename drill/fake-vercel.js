'use strict';
// A fake of the parts of Vercel's REST API that rollbacks use, for the
// drill environment.  Node only, no npm packages.  Request and response
// shapes follow Vercel's documented API (field names as in the docs); the
// data is one project with a handful of deployments.
//
//   GET  /v6/deployments                    list (projectId|app, target, state,
//                                           limit, until, since) + pagination
//   GET  /v13/deployments/{idOrUrl}         one deployment
//   GET  /v9/projects/{idOrName}            project: targets.production,
//                                           lastAliasRequest, lastRollbackTarget
//   POST /v2/deployments/{id}/aliases       {"alias"} -> {uid, alias, created,
//                                           oldDeploymentId}
//   GET  /v2/deployments/{id}/aliases       {"aliases": [...]}
//   GET  /v4/aliases/{idOrAlias}            one alias
//   POST /v10/projects/{p}/promote/{d}      202, asynchronous (lastAliasRequest)
//   POST /v1/projects/{p}/rollback/{d}      201, asynchronous (lastAliasRequest)
//   POST /v1/edge-cache/invalidate-by-tags  CDN purge by tags ({"tags"})
//   POST /v1/edge-cache/dangerously-delete-by-tags
//
// Every /v* call needs `Authorization: Bearer <TOKEN>` (401 otherwise).
// Errors are {"error": {"code", "message"}} like Vercel's.
//
// Test hooks (no auth): GET /_calls (every call so far), DELETE /_calls,
// GET /_state (the whole state), POST /_fail_next_promote (the next promote
// or rollback job ends with jobStatus "failed" and production unchanged).
//
// env: SEED_FILE (JSON: token, project, aliases, deployments, production),
// STATE_FILE (state is saved there after each change and loaded from it on
// start when present), PORT (0 = any free port), READY_FILE ({"pid","port"}
// once listening), JOB_DELAY_MS (how long promote/rollback jobs stay
// "pending"; default 800).
const http = require('http');
const fs = require('fs');
const crypto = require('crypto');

const jobDelay = Number(process.env.JOB_DELAY_MS || 800);
const stateFile = process.env.STATE_FILE;

function aliasUid(name) {
  return 'alias_' + crypto.createHash('sha1').update(name).digest('hex').slice(0, 24);
}

function loadState() {
  if (stateFile && fs.existsSync(stateFile)) {
    return JSON.parse(fs.readFileSync(stateFile, 'utf8'));
  }
  const seed = JSON.parse(fs.readFileSync(process.env.SEED_FILE, 'utf8'));
  const now = Date.now();
  const st = {
    token: seed.token,
    project: Object.assign({
      accountId: 'team_drill', framework: null, nodeVersion: '20.x', live: false,
      createdAt: now - 90 * 86400000, updatedAt: now,
      lastAliasRequest: null, lastRollbackTarget: null,
    }, seed.project),
    deployments: seed.deployments,
    aliases: [],
    production: seed.production,
    failNext: false,
    jobs: 0,
  };
  const prod = st.deployments.find((d) => d.uid === st.production);
  for (const name of seed.aliases || []) {
    st.aliases.push({
      uid: aliasUid(name),
      alias: name, deploymentId: st.production, projectId: st.project.id,
      created: prod ? prod.created : now, updatedAt: prod ? prod.created : now, redirect: null,
    });
  }
  return st;
}

const state = loadState();
const calls = [];

function save() {
  if (!stateFile) return;
  const tmp = stateFile + '.tmp';
  fs.writeFileSync(tmp, JSON.stringify(state, null, 2));
  fs.renameSync(tmp, stateFile);
}
save();

function findDeployment(idOrUrl) {
  const key = String(idOrUrl).replace(/^https?:\/\//, '');
  return state.deployments.find((d) => d.uid === key || d.url === key);
}

function isProject(idOrName) {
  return idOrName === state.project.id || idOrName === state.project.name;
}

// A deployment as /v6/deployments lists it.
function listed(d) {
  return {
    uid: d.uid, name: d.name, url: d.url, created: d.created, createdAt: d.created,
    buildingAt: d.buildingAt, ready: d.ready, source: d.source || 'git',
    state: d.readyState, readyState: d.readyState,
    readySubstate: d.uid === state.production ? 'PROMOTED'
      : (d.target === 'production' && d.readyState === 'READY' ? 'STAGED' : undefined),
    type: 'LAMBDAS', creator: d.creator, meta: d.meta, target: d.target,
    aliasAssigned: d.aliasAssigned, aliasError: null,
    isRollbackCandidate: d.target === 'production' && d.readyState === 'READY' && d.uid !== state.production,
    projectId: state.project.id,
    inspectorUrl: `https://vercel.com/drill/${state.project.name}/${d.uid.replace(/^dpl_/, '')}`,
  };
}

// A deployment as /v13/deployments/{id} and project targets return it.
function full(d) {
  return Object.assign(listed(d), {
    id: d.uid,
    alias: state.aliases.filter((a) => a.deploymentId === d.uid).map((a) => a.alias),
    aliasAssigned: d.aliasAssigned !== null && d.aliasAssigned !== undefined,
    public: false, status: d.readyState, version: 2, regions: ['iad1'],
    gitSource: d.meta && d.meta.githubCommitSha
      ? { type: 'github', ref: d.meta.githubCommitRef, sha: d.meta.githubCommitSha } : undefined,
  });
}

function projectJson() {
  const prod = state.deployments.find((d) => d.uid === state.production);
  const latest = state.deployments.slice().sort((a, b) => b.created - a.created).slice(0, 5);
  return Object.assign({}, state.project, {
    targets: { production: prod ? full(prod) : null },
    latestDeployments: latest.map(full),
  });
}

function send(res, status, body) {
  if (body === undefined) {
    res.writeHead(status, { 'content-length': 0 });
    return res.end();
  }
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json; charset=utf-8',
    'content-length': Buffer.byteLength(text),
  });
  res.end(text);
}

function fail(res, status, code, message, extra) {
  send(res, status, { error: Object.assign({ code, message }, extra || {}) });
}

// Point every production alias at `to`; the project's production target
// follows.
function moveProduction(to) {
  const now = Date.now();
  for (const a of state.aliases) {
    a.deploymentId = to;
    a.updatedAt = now;
  }
  const d = state.deployments.find((x) => x.uid === to);
  if (d) d.aliasAssigned = now;
  state.production = to;
  state.project.updatedAt = now;
}

// promote / rollback: accepted now, done after jobDelay ms
function startAliasJob(res, type, deployment) {
  const cur = state.project.lastAliasRequest;
  if (cur && (cur.jobStatus === 'pending' || cur.jobStatus === 'in-progress')) {
    return fail(res, 409, 'alias_request_in_progress',
      `A ${cur.type} to ${cur.toDeploymentId} is still in progress.`);
  }
  const willFail = state.failNext;
  state.failNext = false;
  const req = {
    fromDeploymentId: state.production, toDeploymentId: deployment.uid,
    jobStatus: 'pending', requestedAt: Date.now(), type,
  };
  state.project.lastAliasRequest = req;
  if (type === 'rollback') state.project.lastRollbackTarget = Object.assign({}, req);
  state.jobs++;
  save();
  setTimeout(() => {
    if (willFail) {
      req.jobStatus = 'failed';
    } else {
      moveProduction(deployment.uid);
      req.jobStatus = 'succeeded';
    }
    if (type === 'rollback') state.project.lastRollbackTarget = Object.assign({}, req);
    save();
  }, jobDelay);
  send(res, type === 'promote' ? 202 : 201);
}

function listDeployments(res, q) {
  let list = state.deployments.slice();
  const pid = q.get('projectId') || q.get('app');
  if (pid && !isProject(pid)) list = [];
  if (q.get('target')) list = list.filter((d) => (d.target || 'preview') === q.get('target'));
  if (q.get('state')) {
    const states = q.get('state').split(',').map((s) => s.trim().toUpperCase());
    list = list.filter((d) => states.includes(d.readyState));
  }
  if (q.get('until')) list = list.filter((d) => d.created < Number(q.get('until')));
  if (q.get('since')) list = list.filter((d) => d.created > Number(q.get('since')));
  list.sort((a, b) => b.created - a.created);
  const limit = Math.max(1, Math.min(100, Number(q.get('limit') || 20)));
  const page = list.slice(0, limit);
  const more = list.length > limit;
  send(res, 200, {
    deployments: page.map(listed),
    pagination: {
      count: page.length,
      next: more ? page[page.length - 1].created : null,
      prev: page.length ? page[0].created : null,
    },
  });
}

function readBody(req) {
  return new Promise((resolve) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
  });
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://fake-vercel');
  const p = url.pathname;
  const text = await readBody(req);
  let body = null;
  if (text) {
    try { body = JSON.parse(text); } catch (e) { body = text; }
  }
  const auth = req.headers.authorization || '';
  const call = {
    method: req.method, path: p, query: Object.fromEntries(url.searchParams),
    body, authorized: auth === `Bearer ${state.token}`, at: Date.now(),
  };
  const origEnd = res.end.bind(res);
  res.end = (...a) => { call.status = res.statusCode; return origEnd(...a); };
  if (!p.startsWith('/_')) calls.push(call);

  // test hooks
  if (p === '/_calls' && req.method === 'GET') return send(res, 200, { calls });
  if (p === '/_calls' && req.method === 'DELETE') { calls.length = 0; return send(res, 200, { ok: true }); }
  if (p === '/_state' && req.method === 'GET') return send(res, 200, state);
  if (p === '/_fail_next_promote' && req.method === 'POST') {
    state.failNext = true;
    save();
    return send(res, 200, { armed: true });
  }

  if (!/^\/v\d+\//.test(p)) return fail(res, 404, 'not_found', 'The requested URL was not found.');
  if (!call.authorized) {
    return fail(res, 401, 'forbidden', 'Not authorized', { invalidToken: true });
  }

  let m;
  if (req.method === 'GET' && p === '/v6/deployments') return listDeployments(res, url.searchParams);

  if (req.method === 'GET' && (m = /^\/v1[13]\/deployments\/([^/]+)$/.exec(p))) {
    const d = findDeployment(decodeURIComponent(m[1]));
    if (!d) return fail(res, 404, 'deployment_not_found', `Deployment ${m[1]} not found.`);
    return send(res, 200, full(d));
  }

  if (req.method === 'GET' && (m = /^\/v9\/projects\/([^/]+)$/.exec(p))) {
    if (!isProject(decodeURIComponent(m[1]))) return fail(res, 404, 'not_found', 'Project not found.');
    return send(res, 200, projectJson());
  }

  if ((m = /^\/v2\/deployments\/([^/]+)\/aliases$/.exec(p))) {
    const d = findDeployment(decodeURIComponent(m[1]));
    if (!d) return fail(res, 404, 'deployment_not_found', `Deployment ${m[1]} not found.`);
    if (req.method === 'GET') {
      return send(res, 200, {
        aliases: state.aliases.filter((a) => a.deploymentId === d.uid)
          .map((a) => ({
            uid: a.uid, alias: a.alias, created: new Date(a.created).toISOString(), redirect: null,
          })),
      });
    }
    if (req.method !== 'POST') return fail(res, 405, 'method_not_allowed', 'Method not allowed.');
    const name = body && typeof body === 'object' ? body.alias : null;
    if (typeof name !== 'string' || !name) {
      return fail(res, 400, 'bad_request', 'Invalid request: missing required property `alias`.');
    }
    if (d.readyState !== 'READY') {
      return fail(res, 400, 'deployment_not_ready', `Deployment ${d.uid} is ${d.readyState}, not READY.`);
    }
    let a = state.aliases.find((x) => x.alias === name);
    if (a && a.deploymentId === d.uid) {
      return fail(res, 409, 'alias_in_use', `The alias ${name} is already assigned to ${d.uid}.`,
        { deploymentId: d.uid });
    }
    const now = Date.now();
    const old = a ? a.deploymentId : null;
    if (a) {
      a.deploymentId = d.uid;
      a.updatedAt = now;
    } else {
      a = {
        uid: aliasUid(name), alias: name,
        deploymentId: d.uid, projectId: state.project.id, created: now, updatedAt: now, redirect: null,
      };
      state.aliases.push(a);
    }
    d.aliasAssigned = now;
    // the production domains all point at one deployment: that is production
    if (state.aliases.every((x) => x.deploymentId === d.uid)) {
      state.production = d.uid;
      state.project.updatedAt = now;
    }
    save();
    return send(res, 200, {
      uid: a.uid, alias: a.alias, created: new Date(now).toISOString(), oldDeploymentId: old,
    });
  }

  if (req.method === 'GET' && (m = /^\/v[24]\/aliases\/([^/]+)$/.exec(p))) {
    const key = decodeURIComponent(m[1]);
    const a = state.aliases.find((x) => x.uid === key || x.alias === key);
    if (!a) return fail(res, 404, 'not_found', `Alias ${key} not found.`);
    return send(res, 200, Object.assign({}, a, { deployment: { id: a.deploymentId } }));
  }

  if (req.method === 'POST' && (m = /^\/v10\/projects\/([^/]+)\/promote\/([^/]+)$/.exec(p))
      || req.method === 'POST' && (m = /^\/v1\/projects\/([^/]+)\/rollback\/([^/]+)$/.exec(p))) {
    const type = p.includes('/promote/') ? 'promote' : 'rollback';
    if (!isProject(decodeURIComponent(m[1]))) return fail(res, 404, 'not_found', 'Project not found.');
    const d = findDeployment(decodeURIComponent(m[2]));
    if (!d) return fail(res, 404, 'deployment_not_found', `Deployment ${m[2]} not found.`);
    if (d.readyState !== 'READY') {
      return fail(res, 400, 'deployment_not_ready', `Deployment ${d.uid} is ${d.readyState}, not READY.`);
    }
    if (type === 'rollback' && d.target !== 'production') {
      return fail(res, 422, 'not_a_production_deployment',
        `Deployment ${d.uid} was never a production deployment.`);
    }
    return startAliasJob(res, type, d);
  }

  m = /^\/v1\/edge-cache\/(invalidate-by-tags|dangerously-delete-by-tags)$/.exec(p);
  if (req.method === 'POST' && m) {
    const pid = url.searchParams.get('projectIdOrName');
    if (!pid || !isProject(pid)) return fail(res, 400, 'bad_request', 'projectIdOrName is required.');
    const tags = body && body.tags;
    if (!tags || (Array.isArray(tags) && !tags.length)) {
      return fail(res, 400, 'bad_request', 'Invalid request: missing required property `tags`.');
    }
    return send(res, 200, {});
  }

  return fail(res, 404, 'not_found', 'The requested URL was not found.');
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((e) => {
    process.stderr.write(`fake-vercel: ${e.stack}\n`);
    if (!res.headersSent) fail(res, 500, 'internal_server_error', e.message);
  });
});

server.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  const port = server.address().port;
  process.stdout.write(`fake-vercel listening on 127.0.0.1:${port} (pid ${process.pid})\n`);
  if (process.env.READY_FILE) {
    fs.writeFileSync(process.env.READY_FILE, JSON.stringify({ pid: process.pid, port }) + '\n');
  }
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => { server.close(); process.exit(0); });
}
