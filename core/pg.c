/* pg.c: PostgreSQL on libpq's asynchronous API (module "rbe.pg.core",
 * wrapped by lua/rbe/pg.lua).  Each connection is driven by one uv_poll on
 * libpq's socket: connecting is PQconnectStartParams + PQconnectPoll (the
 * poll handle is made anew after every PQconnectPoll, since libpq may have
 * replaced the socket, even under the same number), and every request is
 * sent with the PQsend* calls in non-blocking mode and read back with
 * PQconsumeInput/PQgetResult.  Nothing here blocks the loop on the network:
 * a host name is resolved with uv_getaddrinfo before libpq sees it (libpq
 * would look it up inside PQconnectPoll), and PQcancel, which blocks in
 * libpq 15, runs on libuv's thread pool.
 *
 * Ownership: a `pgconn` is malloc'd and owned by C.  It is freed only when
 * it is closed, its uv handles got their close callbacks, no cancel request
 * is running on the thread pool, and no "rbe.pg.conn" userdata points at
 * it.  Requests (`pgop`) queue FIFO on their connection and the head one is
 * on the wire.  A request whose task gave up (timeout, cancelled task) stays
 * at the head while it is cancelled on the server and drained, and is freed
 * when its last result arrived; the next request is sent only after that
 * and after the cancel request returned, so a late cancel never hits it.  A
 * request's results are copied out of each PGresult as it arrives (and the
 * PGresult cleared while hot) into the request's arena.  A finished request
 * is handed to its task through the bridge and from then on belongs to the
 * push function, or to the "rbe.pg.box" userdata that carries it into the
 * continuation, where the copies become Lua values.
 * A transaction holds its connection's lock: requests of other tasks wait
 * in a second queue until it ends. */
#include "aux.h"
#include "task.h"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <fcntl.h>
#include <libpq-fe.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define CONN_MT "rbe.pg.conn"
#define TX_MT "rbe.pg.tx"
#define BOX_MT "rbe.pg.box"
#define SEM_MT "rbe.pg.semaphore"
#define BYTEA_MT "rbe.pg.bytea"
#define JBUF_MT "rbe.pg.jbuf"

#define DESC_MAX 300
#define CONNECT_TIMEOUT 10.0
#define MAX_NOTIFS 10000
#define MAX_NOTICES 100
#define COPY_CHUNK (64 * 1024)
#define SNIPPET 160
#define JSON_DEPTH 200
#define MAX_SECRETS 6
#define MAX_PARAMS 65535

typedef struct pgconn pgconn;
typedef struct pgop pgop;

enum { CS_CONNECTING, CS_READY, CS_BROKEN, CS_CLOSED, CS_RESOLVING };
enum { OP_QUERY, OP_EXEC, OP_PIPELINE, OP_COPY_OUT, OP_COPY_IN, OP_LOCK };
enum { OPS_QUEUED, OPS_SENT, OPS_SEND_FAILED };

static const char *const state_names[] = {"connecting", "ready", "broken",
                                          "closed", "connecting"};

/* Method names for messages and waits: [0] on a connection, [1] on a tx. */
static const char *const N_QUERY[2] = {"db:query", "tx:query"};
static const char *const N_EXEC[2] = {"db:exec", "tx:exec"};
static const char *const N_PIPE[2] = {"db:pipeline", "tx:pipeline"};
static const char *const N_COPY_OUT[2] = {"db:copy_out", "tx:copy_out"};
static const char *const N_COPY_IN[2] = {"db:copy_in", "tx:copy_in"};
static const char *const N_LISTEN[2] = {"db:listen", "tx:listen"};
static const char *const N_ESCAPE[2] = {"db:escape_literal", "tx:escape_literal"};
static const char *const N_INFO[2] = {"db:info", "tx:info"};

/* A result copied out of its PGresult as it arrives (the PGresult is
 * cleared at once, while hot): offsets into the request's arena. */
typedef struct {
  int present;
  int ntuples, nfields;
  lua_Integer affected;
  size_t cmd;              /* the command tag, NUL-terminated */
  size_t fields;           /* nfields x cfield */
  size_t values;           /* ntuples x nfields x cvalue */
} cres;

typedef struct { Oid type; uint32_t name; } cfield;
typedef struct { int32_t len; uint32_t off; } cvalue;  /* len -1: NULL */

typedef struct {
  const char *sql;
  int nparams;
  const Oid *types;
  const char *const *values;
  const int *lengths, *formats;
} stmt;

struct pgop {
  pgop *next;
  pgconn *c;               /* NULL once detached from its connection */
  int kind, state;
  const char *what;
  rbe_wait *w;             /* the waiting task; NULL once answered/abandoned */
  uint64_t deadline;       /* loop time in ms; 0: none */
  double timeout;
  long token;              /* the transaction it belongs to (0: none) */
  rbe_task *task;
  int nstmt;
  stmt *stmts;
  cres *res;               /* results (per statement for pipelines) */
  int nres, capres;
  char *arena;             /* their names, tags and values */
  size_t alen, acap;
  int cur;                 /* pipeline: statement being answered */
  int synced;              /* pipeline: its Sync was answered */
  PGresult *err;           /* the first error result */
  int err_stmt;
  int conn_bad;            /* the connection broke while it ran */
  int send_fatal;          /* a pipeline half sent: connection unusable */
  char *fail;              /* a local failure (malloc'd message) */
  int abort;               /* COPY FROM STDIN: end it with an error */
  int phase;               /* COPY: 0 before, 1 in the data, 2 after */
  int copying;             /* in the data: 1 from the server, 2 to it */
  int copied;              /* a COPY started */
  int fd;
  const char *path;
  char *tmp;               /* copy_out: the temporary file, renamed at end */
  char *buf;
  size_t blen, bpos;
  int eof, io_err;
  const char *io_what;
  long long bytes;
  long granted;            /* OP_LOCK: the token granted */
  /* followed by the statements, parameters and path (op_new) */
};

typedef struct notif {
  struct notif *next;
  int pid;
  char *payload;
  char channel[];
} notif;

typedef struct lwait {
  struct lwait *next, *prev;
  pgconn *c;
  rbe_wait *w;
  uint64_t deadline;
  double timeout;
  char channel[];          /* "" waits for any channel */
} lwait;

struct pgconn {
  PGconn *pq;
  int state;
  uv_poll_t *poll;
  int poll_fd, poll_events, poll_refd;
  uv_timer_t *timer;
  int handles;             /* open handles + running cancel requests */
  int owned;               /* an "rbe.pg.conn" userdata points here */
  int kicked;              /* the timer runs "soon" for deferred work */
  int ncancel;             /* cancel requests on the thread pool */
  int ntimed;              /* requests and waits with a deadline */
  rbe_wait *connect_w;
  uv_getaddrinfo_t *gai;   /* resolving the host name, before libpq */
  char **ckw, **cval;      /* the parameters, kept while resolving */
  int nkw;
  uint64_t connect_deadline;
  double connect_timeout;
  double timeout;          /* default per-request timeout, 0: none */
  pgop *head, *tail;       /* runnable; the head may be on the wire */
  pgop *bhead, *btail;     /* waiting for another transaction to end */
  long lock_token, next_token;
  rbe_task *lock_task;
  notif *nhead, *ntail;
  int nnotif;
  long ndropped;
  lwait *lwaits;
  char *notices[MAX_NOTICES];
  int nnotices;
  char *broken;            /* why the connection was lost */
  char *secrets[MAX_SECRETS]; /* scrubbed from connect errors */
  int nsecrets;
  char desc[DESC_MAX];     /* postgresql://user:***@host:port/db */
};

typedef struct { pgconn *c; } conn_ud;
typedef struct { long token; int done; } tx_ud;  /* user value 1: conn */
typedef struct { pgop *op; } box;

typedef struct semwait {
  struct semwait *next, *prev;
  struct sem *s;
  rbe_wait *w;
} semwait;

typedef struct sem {
  lua_Integer permits;
  semwait *head, *tail;
} sem;

typedef struct {
  uv_work_t req;
  pgconn *c;
  PGcancel *pc;
  int ok;
  char err[256];
} cancel_req;

/* An error to push later: kind, code, retryable and the message. */
typedef struct {
  const char *kind;
  char code[16];
  int retryable;
  char msg[];
} emsg;

static struct { long conns, ops; } S;
static char kw_key;          /* registry: set of libpq connection keywords */
static long tmp_counter;

static void poll_cb(uv_poll_t *h, int status, int events);
static void timer_cb(uv_timer_t *t);
static void process(pgconn *c);
static void pump(pgconn *c);
static void conn_lost(pgconn *c, const char *why);
static void release_lock(pgconn *c);
static void connect_step(pgconn *c);
static void connect_fail(pgconn *c, const char *kind, const char *code,
                         int retry, const char *msg);
static int push_notif_fn(lua_State *L, void *ud);
int luaopen_rbe_pg(lua_State *L);

/* ---- small helpers ---- */

typedef struct { char *p; size_t n, cap; int oom; } sbuf;

static void sb_add(sbuf *b, const char *s, size_t n) {
  if (b->oom) return;
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 256;
    while (cap < b->n + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) { b->oom = 1; return; }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = 0;
}

static void sb_str(sbuf *b, const char *s) { if (s) sb_add(b, s, strlen(s)); }

static void sb_fmt(sbuf *b, const char *fmt, ...) {
  char tmp[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  sb_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static char *xstrdup(const char *s) {
  if (!s) return NULL;
  size_t n = strlen(s);
  char *p = malloc(n + 1);
  if (p) memcpy(p, s, n + 1);
  return p;
}

/* A copy of a libpq message without its trailing newlines. */
static char *msg_dup(const char *s) {
  char *p = xstrdup(s && *s ? s : "unknown error");
  if (!p) return NULL;
  size_t n = strlen(p);
  while (n && (p[n - 1] == '\n' || p[n - 1] == ' ')) p[--n] = 0;
  return p;
}

/* The first line(s) of a statement, for messages. */
static void sb_snippet(sbuf *b, const char *sql) {
  if (!sql) return;
  while (*sql == ' ' || *sql == '\n' || *sql == '\t') sql++;
  size_t n = strlen(sql);
  size_t k = n < SNIPPET ? n : SNIPPET;
  for (size_t i = 0; i < k; i++) {
    char ch = sql[i] == '\n' || sql[i] == '\t' || sql[i] == '\r' ? ' '
                                                                 : sql[i];
    sb_add(b, &ch, 1);
  }
  if (k < n) sb_str(b, "...");
}

static const char *fmt_secs(char *buf, size_t n, double s) {
  snprintf(buf, n, "%gs", s);
  return buf;
}

static int push_emsg(lua_State *L, void *ud) {
  emsg *e = ud;
  if (!L) { free(e); return 0; }
  if (!e) {
    rbe_error_push(L, "pg", 0, "out of memory");
    return 1;
  }
  rbe_error_push(L, e->kind, e->retryable, "%s", e->msg);
  if (e->code[0]) rbe_error_code_str(L, e->code);
  free(e);
  return 1;
}

static emsg *emsg_new(const char *kind, const char *code, int retry,
                      const char *msg) {
  size_t n = strlen(msg);
  emsg *e = malloc(sizeof *e + n + 1);
  if (!e) return NULL;
  e->kind = kind;
  snprintf(e->code, sizeof e->code, "%s", code ? code : "");
  e->retryable = retry;
  memcpy(e->msg, msg, n + 1);
  return e;
}

/* Fail wait w with an error object built from the arguments. */
static void fail_with(rbe_wait *w, const char *kind, const char *code,
                      int retry, const char *fmt, ...) {
  char tmp[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  rbe_wait_fail(w, push_emsg, emsg_new(kind, code, retry, tmp));
}

static int retryable_code(const char *code) {
  if (!code) return 0;
  return strncmp(code, "08", 2) == 0 || strcmp(code, "40001") == 0 ||
         strcmp(code, "40P01") == 0 || strcmp(code, "57P01") == 0 ||
         strcmp(code, "57P02") == 0 || strcmp(code, "57P03") == 0 ||
         strcmp(code, "53300") == 0;
}

/* ---- secrets ---- */

/* Replace every occurrence of the connection's secrets in msg, and any
 * password in a URL (scheme://user:PASSWORD@) or a key/value string
 * (password=...), by ***.  Returns a malloc'd string. */
static char *scrub(const char *msg, char *const *secrets, int nsecrets) {
  sbuf b = {0};
  const char *s = msg ? msg : "";
  while (*s) {
    int hit = 0;
    for (int i = 0; i < nsecrets; i++) {
      size_t n = secrets[i] ? strlen(secrets[i]) : 0;
      if (n >= 3 && strncmp(s, secrets[i], n) == 0) {
        sb_str(&b, "***");
        s += n;
        hit = 1;
        break;
      }
    }
    if (hit) continue;
    if (strncmp(s, "://", 3) == 0) {
      /* user:password@ up to the first @ before any / */
      const char *at = s + 3;
      while (*at && *at != '@' && *at != '/' && *at != ' ' && *at != '"')
        at++;
      const char *colon = memchr(s + 3, ':', (size_t)(at - (s + 3)));
      if (*at == '@' && colon) {
        sb_add(&b, s, (size_t)(colon - s) + 1);
        sb_str(&b, "***");
        s = at;
        continue;
      }
    }
    if (strncasecmp(s, "password", 8) == 0) {
      const char *p = s + 8;
      while (*p == ' ') p++;
      if (*p == '=') {
        p++;
        while (*p == ' ') p++;
        sb_add(&b, s, (size_t)(p - s));
        sb_str(&b, "***");
        if (*p == '\'') {
          p++;
          while (*p && *p != '\'') { if (*p == '\\' && p[1]) p++; p++; }
          if (*p) p++;
        } else {
          while (*p && *p != ' ' && *p != '&' && *p != '"') p++;
        }
        s = p;
        continue;
      }
    }
    sb_add(&b, s, 1);
    s++;
  }
  if (!b.p) return xstrdup("");
  return b.p;
}

static void add_secret(pgconn *c, const char *s) {
  if (!s || !*s || c->nsecrets == MAX_SECRETS) return;
  for (int i = 0; i < c->nsecrets; i++)
    if (strcmp(c->secrets[i], s) == 0) return;
  char *p = xstrdup(s);
  if (p) c->secrets[c->nsecrets++] = p;
}

static void free_secrets(pgconn *c) {
  for (int i = 0; i < c->nsecrets; i++) {
    explicit_bzero(c->secrets[i], strlen(c->secrets[i]));
    free(c->secrets[i]);
  }
  c->nsecrets = 0;
}

/* The raw (still percent-encoded) password of a postgresql:// URL. */
static int url_password(const char *url, char *out, size_t outsz) {
  const char *p = strstr(url, "://");
  if (!p) return 0;
  p += 3;
  const char *at = p;
  while (*at && *at != '@' && *at != '/') at++;
  if (*at != '@') return 0;
  const char *colon = memchr(p, ':', (size_t)(at - p));
  if (!colon) return 0;
  size_t n = (size_t)(at - colon - 1);
  if (n + 1 > outsz) n = outsz - 1;
  memcpy(out, colon + 1, n);
  out[n] = 0;
  return n > 0;
}

/* ---- life cycle ---- */

static void free_kw(pgconn *c) {
  for (int i = 0; i < c->nkw; i++) {
    free(c->ckw[i]);
    if (c->cval[i]) explicit_bzero(c->cval[i], strlen(c->cval[i]));
    free(c->cval[i]);
  }
  free(c->ckw);
  free(c->cval);
  c->ckw = c->cval = NULL;
  c->nkw = 0;
}

static void maybe_free(pgconn *c) {
  if (c->owned || c->handles || c->head || c->bhead || c->lwaits ||
      c->state != CS_CLOSED)
    return;
  free_kw(c);
  for (int i = 0; i < c->nnotices; i++) free(c->notices[i]);
  free(c->broken);
  free_secrets(c);
  free(c);
  S.conns--;
}

static void op_free(pgop *op) {
  free(op->res);
  free(op->arena);
  if (op->err) PQclear(op->err);
  free(op->fail);
  if (op->fd >= 0) close(op->fd);
  if (op->tmp) {
    unlink(op->tmp);
    free(op->tmp);
  }
  free(op->buf);
  free(op);
  S.ops--;
}

static void handle_close_cb(uv_handle_t *h) {
  pgconn *c = h->data;
  free(h);
  rbe_counts[RBE_COUNT_HANDLES]--;
  c->handles--;
  maybe_free(c);
}

static void update_ref(pgconn *c) {
  if (!c->poll) return;
  int want = c->head || c->bhead || c->lwaits || c->connect_w;
  if (want && !c->poll_refd) uv_ref((uv_handle_t *)c->poll);
  if (!want && c->poll_refd) uv_unref((uv_handle_t *)c->poll);
  c->poll_refd = want;
}

static void close_poll(pgconn *c) {
  if (!c->poll) return;
  uv_close((uv_handle_t *)c->poll, handle_close_cb);
  c->poll = NULL;
  c->poll_events = 0;
}

/* Watch fd for events with a fresh poll handle (libpq may have closed the
 * previous socket and opened another under the same number). */
static int poll_watch(pgconn *c, int fd, int events) {
  close_poll(c);
  if (fd < 0) return UV_EBADF;
  uv_poll_t *p = malloc(sizeof *p);
  if (!p) return UV_ENOMEM;
  int r = uv_poll_init(rbe_loop(), p, fd);
  if (r < 0) { free(p); return r; }
  p->data = c;
  c->poll = p;
  c->poll_fd = fd;
  c->poll_refd = 1;
  c->handles++;
  rbe_counts[RBE_COUNT_HANDLES]++;
  uv_poll_start(p, events, poll_cb);
  c->poll_events = events;
  update_ref(c);
  return 0;
}

static void poll_update(pgconn *c) {
  if (c->state != CS_READY || !c->poll) return;
  int f = PQflush(c->pq);
  int ev = UV_READABLE | (f == 1 ? UV_WRITABLE : 0);
  if (ev != c->poll_events) {
    uv_poll_start(c->poll, ev, poll_cb);
    c->poll_events = ev;
  }
  update_ref(c);
}

static void timer_arm(pgconn *c) {
  if (!c->timer) return;
  uint64_t now = uv_now(rbe_loop()), next = UINT64_MAX;
  if (c->kicked) next = now;
  if (c->state == CS_CONNECTING && c->connect_deadline < next)
    next = c->connect_deadline;
  if (c->ntimed) {
    for (pgop *op = c->head; op; op = op->next)
      if (op->w && op->deadline && op->deadline < next) next = op->deadline;
    for (pgop *op = c->bhead; op; op = op->next)
      if (op->w && op->deadline && op->deadline < next) next = op->deadline;
    for (lwait *lw = c->lwaits; lw; lw = lw->next)
      if (lw->deadline && lw->deadline < next) next = lw->deadline;
  }
  if (next == UINT64_MAX) uv_timer_stop(c->timer);
  else uv_timer_start(c->timer, timer_cb, next > now ? next - now : 0, 0);
}

/* Run timer_cb soon: work that must not happen inside the caller. */
static void kick(pgconn *c) {
  c->kicked = 1;
  timer_arm(c);
}

static void free_notifs(pgconn *c) {
  while (c->nhead) {
    notif *n = c->nhead;
    c->nhead = n->next;
    free(n);
  }
  c->ntail = NULL;
  c->nnotif = 0;
}

/* Stop watching, stop the timer and drop the libpq connection. */
static void release_io(pgconn *c) {
  if (c->gai) uv_cancel((uv_req_t *)c->gai);   /* its callback frees it */
  close_poll(c);
  if (c->timer) {
    uv_close((uv_handle_t *)c->timer, handle_close_cb);
    c->timer = NULL;
  }
  if (c->pq) {
    PQfinish(c->pq);
    c->pq = NULL;
  }
  free_notifs(c);
}

/* ---- cancel requests (thread pool) ---- */

static void cancel_work_cb(uv_work_t *req) {
  cancel_req *r = req->data;
  r->ok = PQcancel(r->pc, r->err, sizeof r->err);
}

static void cancel_after_cb(uv_work_t *req, int status) {
  (void)status;
  cancel_req *r = req->data;
  pgconn *c = r->c;
  PQfreeCancel(r->pc);
  free(r);
  rbe_counts[RBE_COUNT_HANDLES]--;
  c->handles--;
  c->ncancel--;
  if (c->state == CS_READY) {
    pump(c);
    if (c->state == CS_READY) poll_update(c);
  }
  maybe_free(c);
}

/* Ask the server to stop what this connection runs now. */
static void start_cancel(pgconn *c) {
  if (c->ncancel || !c->pq) return;
  PGcancel *pc = PQgetCancel(c->pq);
  if (!pc) return;
  cancel_req *r = malloc(sizeof *r);
  if (!r) { PQfreeCancel(pc); return; }
  r->req.data = r;
  r->c = c;
  r->pc = pc;
  r->ok = 0;
  r->err[0] = 0;
  if (uv_queue_work(rbe_loop(), &r->req, cancel_work_cb, cancel_after_cb)) {
    PQfreeCancel(pc);
    free(r);
    return;
  }
  c->ncancel++;
  c->handles++;
  rbe_counts[RBE_COUNT_HANDLES]++;
}

/* ---- queues ---- */

static void q_append(pgop **head, pgop **tail, pgop *op) {
  op->next = NULL;
  if (*tail) (*tail)->next = op;
  else *head = op;
  *tail = op;
}

static int q_remove(pgop **head, pgop **tail, pgop *op) {
  pgop *prev = NULL;
  for (pgop *p = *head; p; prev = p, p = p->next) {
    if (p != op) continue;
    if (prev) prev->next = p->next;
    else *head = p->next;
    if (*tail == p) *tail = prev;
    p->next = NULL;
    return 1;
  }
  return 0;
}

/* ---- results into Lua ---- */

static void push_value(lua_State *L, Oid type, const char *s, size_t len);

static int hexval(int ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

static void push_bytea(lua_State *L, const char *s, size_t len) {
  if (len >= 2 && s[0] == '\\' && s[1] == 'x') {
    luaL_Buffer b;
    size_t n = (len - 2) / 2;
    char *out = luaL_buffinitsize(L, &b, n);
    size_t k = 0;
    for (size_t i = 2; i + 1 < len; i += 2) {
      int hi = hexval((unsigned char)s[i]), lo = hexval((unsigned char)s[i + 1]);
      if (hi < 0 || lo < 0) break;
      out[k++] = (char)(hi << 4 | lo);
    }
    luaL_pushresultsize(&b, k);
    return;
  }
  /* the old escape format: libpq knows it */
  char *z = malloc(len + 1);
  if (!z) luaL_error(L, "out of memory");
  memcpy(z, s, len);
  z[len] = 0;
  size_t n;
  unsigned char *u = PQunescapeBytea((unsigned char *)z, &n);
  free(z);
  if (!u) luaL_error(L, "out of memory");
  lua_pushlstring(L, (char *)u, n);
  PQfreemem(u);
}

/* -- JSON decoding: null becomes rbe.null, integers stay integers -- */

typedef struct { const char *p, *e; int depth; } jdec;

static void jd_ws(jdec *d) {
  while (d->p < d->e && (*d->p == ' ' || *d->p == '\t' || *d->p == '\n' ||
                         *d->p == '\r'))
    d->p++;
}

static void utf8_add(luaL_Buffer *b, unsigned long cp) {
  char t[4];
  int n;
  if (cp < 0x80) { t[0] = (char)cp; n = 1; }
  else if (cp < 0x800) {
    t[0] = (char)(0xC0 | cp >> 6); t[1] = (char)(0x80 | (cp & 0x3F)); n = 2;
  } else if (cp < 0x10000) {
    t[0] = (char)(0xE0 | cp >> 12); t[1] = (char)(0x80 | (cp >> 6 & 0x3F));
    t[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
  } else {
    t[0] = (char)(0xF0 | cp >> 18); t[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    t[2] = (char)(0x80 | (cp >> 6 & 0x3F)); t[3] = (char)(0x80 | (cp & 0x3F));
    n = 4;
  }
  luaL_addlstring(b, t, (size_t)n);
}

static int jd_hex4(jdec *d, unsigned long *out) {
  if (d->e - d->p < 4) return -1;
  unsigned long v = 0;
  for (int i = 0; i < 4; i++) {
    int h = hexval((unsigned char)d->p[i]);
    if (h < 0) return -1;
    v = v << 4 | (unsigned long)h;
  }
  d->p += 4;
  *out = v;
  return 0;
}

static int jd_string(lua_State *L, jdec *d) {
  const char *s = ++d->p;
  const char *q = s;
  while (q < d->e && *q != '"' && *q != '\\') q++;
  if (q < d->e && *q == '"') {
    lua_pushlstring(L, s, (size_t)(q - s));
    d->p = q + 1;
    return 0;
  }
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addlstring(&b, s, (size_t)(q - s));
  d->p = q;
  while (d->p < d->e) {
    char ch = *d->p++;
    if (ch == '"') { luaL_pushresult(&b); return 0; }
    if (ch != '\\') { luaL_addchar(&b, ch); continue; }
    if (d->p >= d->e) break;
    ch = *d->p++;
    switch (ch) {
      case 'b': luaL_addchar(&b, '\b'); break;
      case 'f': luaL_addchar(&b, '\f'); break;
      case 'n': luaL_addchar(&b, '\n'); break;
      case 'r': luaL_addchar(&b, '\r'); break;
      case 't': luaL_addchar(&b, '\t'); break;
      case 'u': {
        unsigned long cp, lo;
        if (jd_hex4(d, &cp)) goto bad;
        if (cp >= 0xD800 && cp < 0xDC00 && d->e - d->p >= 6 &&
            d->p[0] == '\\' && d->p[1] == 'u') {
          const char *save = d->p;
          d->p += 2;
          if (jd_hex4(d, &lo) == 0 && lo >= 0xDC00 && lo < 0xE000)
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          else d->p = save;
        }
        utf8_add(&b, cp);
        break;
      }
      default: luaL_addchar(&b, ch); break;
    }
  }
bad:
  luaL_pushresult(&b);
  lua_pop(L, 1);
  return -1;
}

static int jd_number(lua_State *L, jdec *d) {
  const char *s = d->p, *q = s;
  int isfloat = 0;
  if (q < d->e && *q == '-') q++;
  const char *digits = q;
  while (q < d->e && *q >= '0' && *q <= '9') q++;
  if (q == digits) return -1;
  if (q < d->e && *q == '.') {
    isfloat = 1;
    q++;
    while (q < d->e && *q >= '0' && *q <= '9') q++;
  }
  if (q < d->e && (*q == 'e' || *q == 'E')) {
    isfloat = 1;
    q++;
    if (q < d->e && (*q == '+' || *q == '-')) q++;
    while (q < d->e && *q >= '0' && *q <= '9') q++;
  }
  d->p = q;
  if (!isfloat) {
    int neg = *s == '-';
    unsigned long long v = 0, lim = neg ? (unsigned long long)LLONG_MAX + 1
                                        : (unsigned long long)LLONG_MAX;
    int over = 0;
    for (const char *p = digits; p < q; p++) {
      unsigned dg = (unsigned)(*p - '0');
      if (v > (lim - dg) / 10) { over = 1; break; }
      v = v * 10 + dg;
    }
    if (!over) {
      lua_pushinteger(L, neg ? (lua_Integer)(0 - v) : (lua_Integer)v);
      return 0;
    }
  }
  char tmp[64];
  size_t n = (size_t)(q - s);
  if (n < sizeof tmp) {
    memcpy(tmp, s, n);
    tmp[n] = 0;
    lua_pushnumber(L, strtod(tmp, NULL));
  } else {
    lua_pushnumber(L, strtod(s, NULL));
  }
  return 0;
}

static int jd_value(lua_State *L, jdec *d) {
  jd_ws(d);
  if (d->p >= d->e) return -1;
  char ch = *d->p;
  if (ch == '"') return jd_string(L, d);
  if (ch == '{' || ch == '[') {
    if (++d->depth > JSON_DEPTH) return -1;
    luaL_checkstack(L, 4, "JSON nested too deep");
    d->p++;
    int arr = ch == '[';
    lua_newtable(L);
    int i = 0;
    jd_ws(d);
    if (d->p < d->e && *d->p == (arr ? ']' : '}')) {
      d->p++;
      d->depth--;
      return 0;
    }
    for (;;) {
      if (arr) {
        if (jd_value(L, d)) return -1;
        lua_rawseti(L, -2, ++i);
      } else {
        jd_ws(d);
        if (d->p >= d->e || *d->p != '"' || jd_string(L, d)) return -1;
        jd_ws(d);
        if (d->p >= d->e || *d->p != ':') return -1;
        d->p++;
        if (jd_value(L, d)) return -1;
        lua_rawset(L, -3);
      }
      jd_ws(d);
      if (d->p >= d->e) return -1;
      if (*d->p == ',') { d->p++; continue; }
      if (*d->p == (arr ? ']' : '}')) { d->p++; break; }
      return -1;
    }
    d->depth--;
    return 0;
  }
  if (ch == '-' || (ch >= '0' && ch <= '9')) return jd_number(L, d);
  if (d->e - d->p >= 4 && memcmp(d->p, "true", 4) == 0) {
    d->p += 4; lua_pushboolean(L, 1); return 0;
  }
  if (d->e - d->p >= 5 && memcmp(d->p, "false", 5) == 0) {
    d->p += 5; lua_pushboolean(L, 0); return 0;
  }
  if (d->e - d->p >= 4 && memcmp(d->p, "null", 4) == 0) {
    d->p += 4; rbe_push_null(L); return 0;
  }
  return -1;
}

/* Push the decoded JSON document, or the text itself if it is not JSON. */
static void push_json(lua_State *L, const char *s, size_t len) {
  int top = lua_gettop(L);
  jdec d = {s, s + len, 0};
  if (jd_value(L, &d) == 0) {
    jd_ws(&d);
    if (d.p == d.e) return;
  }
  lua_settop(L, top);
  lua_pushlstring(L, s, len);
}

/* -- arrays in PostgreSQL's text form: {1,2,NULL}, {{1,2},{3,4}} -- */

static Oid array_elem(Oid t) {
  switch (t) {
    case 1000: return 16;   case 1005: return 21;   case 1007: return 23;
    case 1016: return 20;   case 1028: return 26;   case 1021: return 700;
    case 1022: return 701;  case 1231: return 1700; case 1009: return 25;
    case 1015: return 1043; case 1014: return 1042; case 2951: return 2950;
    case 1115: return 1114; case 1185: return 1184; case 1182: return 1082;
    case 1183: return 1083; case 1270: return 1266; case 1187: return 1186;
    case 199: return 114;   case 3807: return 3802; case 1001: return 17;
    case 1002: return 18;   case 1003: return 19;   case 1041: return 869;
    case 651: return 650;   case 1040: return 829;  case 1013: return 30;
    default: return 0;
  }
}

static int arr_level(lua_State *L, const char **ps, const char *e, Oid elem,
                     int depth) {
  const char *s = *ps;
  if (s >= e || *s != '{' || depth > 32) return -1;
  s++;
  luaL_checkstack(L, 4, "array nested too deep");
  lua_newtable(L);
  int i = 0;
  while (s < e && *s == ' ') s++;
  if (s < e && *s == '}') { *ps = s + 1; return 0; }
  for (;;) {
    while (s < e && *s == ' ') s++;
    if (s >= e) return -1;
    if (*s == '{') {
      if (arr_level(L, &s, e, elem, depth + 1)) return -1;
    } else if (*s == '"') {
      luaL_Buffer b;
      luaL_buffinit(L, &b);
      s++;
      while (s < e && *s != '"') {
        if (*s == '\\' && s + 1 < e) s++;
        luaL_addchar(&b, *s);
        s++;
      }
      luaL_pushresult(&b);
      if (s >= e) return -1;
      s++;
      size_t n;
      const char *v = lua_tolstring(L, -1, &n);
      push_value(L, elem, v, n);
      lua_remove(L, -2);
    } else {
      const char *t = s;
      while (s < e && *s != ',' && *s != '}') s++;
      const char *te = s;
      while (te > t && te[-1] == ' ') te--;
      if (te - t == 4 && strncasecmp(t, "NULL", 4) == 0) rbe_push_null(L);
      else push_value(L, elem, t, (size_t)(te - t));
    }
    lua_rawseti(L, -2, ++i);
    while (s < e && *s == ' ') s++;
    if (s < e && *s == ',') { s++; continue; }
    if (s < e && *s == '}') { s++; break; }
    return -1;
  }
  *ps = s;
  return 0;
}

static void push_array(lua_State *L, Oid elem, const char *s, size_t len) {
  int top = lua_gettop(L);
  const char *p = s, *e = s + len;
  if (p < e && *p == '[') {      /* [0:2]={...}: bounds other than 1 */
    while (p < e && *p != '=') p++;
    if (p < e) p++;
  }
  if (arr_level(L, &p, e, elem, 0) == 0 && p == e) return;
  lua_settop(L, top);
  lua_pushlstring(L, s, len);
}

static void push_value(lua_State *L, Oid type, const char *s, size_t len) {
  switch (type) {
    case 16:
      lua_pushboolean(L, len > 0 && s[0] == 't');
      return;
    case 20: case 21: case 23: case 26: {
      char tmp[32];
      if (len < sizeof tmp) {
        memcpy(tmp, s, len);
        tmp[len] = 0;
        char *end;
        errno = 0;
        long long v = strtoll(tmp, &end, 10);
        if (!errno && end != tmp && !*end) { lua_pushinteger(L, v); return; }
      }
      break;
    }
    case 700: case 701: {
      char tmp[64];
      if (len < sizeof tmp) {
        memcpy(tmp, s, len);
        tmp[len] = 0;
        char *end;
        double v = strtod(tmp, &end);
        if (end != tmp && !*end) { lua_pushnumber(L, v); return; }
      }
      break;
    }
    case 17:
      push_bytea(L, s, len);
      return;
    case 114: case 3802:
      push_json(L, s, len);
      return;
    default: {
      Oid elem = array_elem(type);
      if (elem) { push_array(L, elem, s, len); return; }
      break;
    }
  }
  lua_pushlstring(L, s, len);
}

static const char *type_name(Oid t) {
  switch (t) {
    case 16: return "bool"; case 17: return "bytea"; case 18: return "char";
    case 19: return "name"; case 20: return "int8"; case 21: return "int2";
    case 23: return "int4"; case 25: return "text"; case 26: return "oid";
    case 114: return "json"; case 700: return "float4";
    case 701: return "float8"; case 1042: return "bpchar";
    case 1043: return "varchar"; case 1082: return "date";
    case 1083: return "time"; case 1114: return "timestamp";
    case 1184: return "timestamptz"; case 1186: return "interval";
    case 1266: return "timetz"; case 1700: return "numeric";
    case 2950: return "uuid"; case 3802: return "jsonb";
    case 869: return "inet"; case 650: return "cidr";
    default: return NULL;
  }
}

static lua_Integer cmd_tuples(PGresult *r) {
  const char *t = r ? PQcmdTuples(r) : "";
  return t && *t ? strtoll(t, NULL, 10) : 0;
}

#define CF(op, r) ((const cfield *)((op)->arena + (r)->fields))
#define CV(op, r) ((const cvalue *)((op)->arena + (r)->values))
#define CS(op, off) ((op)->arena + (off))

/* Same columns (names and types) in both results? */
static int same_shape(const pgop *op, const cres *a, const cres *b) {
  if (!a || !b || !a->present || !b->present || a->nfields != b->nfields)
    return 0;
  const cfield *fa = CF(op, a), *fb = CF(op, b);
  for (int j = 0; j < a->nfields; j++)
    if (fa[j].type != fb[j].type ||
        strcmp(CS(op, fa[j].name), CS(op, fb[j].name)) != 0)
      return 0;
  return 1;
}

static void push_columns(lua_State *L, const pgop *op, const cres *r) {
  int nf = r ? r->nfields : 0;
  lua_createtable(L, nf, 0);
  for (int j = 0; j < nf; j++) {
    const cfield *f = &CF(op, r)[j];
    lua_createtable(L, 0, 3);
    lua_pushstring(L, CS(op, f->name));
    lua_setfield(L, -2, "name");
    lua_pushinteger(L, (lua_Integer)f->type);
    lua_setfield(L, -2, "type");
    const char *tn = type_name(f->type);
    Oid elem = array_elem(f->type);
    if (!tn && elem && type_name(elem)) {
      lua_pushfstring(L, "%s[]", type_name(elem));
      lua_setfield(L, -2, "type_name");
    } else if (tn) {
      lua_pushstring(L, tn);
      lua_setfield(L, -2, "type_name");
    }
    lua_rawseti(L, -2, j + 1);
  }
}

/* Stack slots describing the last result converted, so that a run of
 * results of the same shape (a pipeline) shares one columns table, the
 * interned column names and the command tag: base = columns, base + 1 =
 * command tag, base + 2... = names. */
typedef struct {
  const cres *r;
  int base;
} rcache;

/* rows: array of {column = value}, with .columns, .command, .affected */
static void push_rows(lua_State *L, const pgop *op, const cres *r,
                      rcache *k) {
  if (r && !r->present) r = NULL;
  int nt = r ? r->ntuples : 0, nf = r ? r->nfields : 0;
  luaL_checkstack(L, nf + 10, "too many columns");
  int cols, cmd, names;
  if (k) {
    cols = k->base;
    cmd = k->base + 1;
    names = k->base + 2;
    if (!same_shape(op, r, k->r)) {
      lua_settop(L, k->base - 1);
      push_columns(L, op, r);
      lua_pushstring(L, r ? CS(op, r->cmd) : "");
      for (int j = 0; j < nf; j++)
        lua_pushstring(L, CS(op, CF(op, r)[j].name));
    } else if (strcmp(CS(op, r->cmd), CS(op, k->r->cmd)) != 0) {
      lua_pushstring(L, CS(op, r->cmd));
      lua_replace(L, cmd);
    }
    k->r = r;
  } else {
    push_columns(L, op, r);
    cols = lua_gettop(L);
    lua_pushstring(L, r ? CS(op, r->cmd) : "");
    cmd = cols + 1;
    names = cols + 2;
    for (int j = 0; j < nf; j++) lua_pushstring(L, CS(op, CF(op, r)[j].name));
  }
  lua_createtable(L, nt, 3);
  int rows = lua_gettop(L);
  lua_pushvalue(L, cols);
  lua_setfield(L, rows, "columns");
  lua_pushvalue(L, cmd);
  lua_setfield(L, rows, "command");
  lua_pushinteger(L, r ? r->affected : 0);
  lua_setfield(L, rows, "affected");
  rbe_push_null(L);
  int nullidx = lua_gettop(L);
  const cfield *f = r ? CF(op, r) : NULL;
  const cvalue *v = r ? CV(op, r) : NULL;
  for (int i = 0; i < nt; i++) {
    lua_createtable(L, 0, nf);
    for (int j = 0; j < nf; j++, v++) {
      lua_pushvalue(L, names + j);
      if (v->len < 0) lua_pushvalue(L, nullidx);
      else push_value(L, f[j].type, CS(op, v->off), (size_t)v->len);
      lua_rawset(L, -3);
    }
    lua_rawseti(L, rows, i + 1);
  }
  lua_settop(L, rows);
  if (!k) {
    lua_replace(L, cols);        /* drop the slots, keep the rows */
    lua_settop(L, cols);
  }
}

/* ---- errors from results ---- */

static void set_field_str(lua_State *L, const char *name, const char *v) {
  if (!v) return;
  lua_pushstring(L, v);
  lua_setfield(L, -2, name);
}

static void push_server_error(lua_State *L, pgop *op) {
  PGresult *r = op->err;
  const char *code = PQresultErrorField(r, PG_DIAG_SQLSTATE);
  const char *prim = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
  const char *detail = PQresultErrorField(r, PG_DIAG_MESSAGE_DETAIL);
  const char *hint = PQresultErrorField(r, PG_DIAG_MESSAGE_HINT);
  const char *pos = PQresultErrorField(r, PG_DIAG_STATEMENT_POSITION);
  int lost = !code && op->conn_bad;
  sbuf b = {0};
  sb_str(&b, op->what);
  sb_str(&b, ": ");
  if (op->nstmt > 1 || op->kind == OP_EXEC) {
    if (op->kind == OP_EXEC) sb_fmt(&b, "statement %d of the script: ",
                                    op->err_stmt);
    else sb_fmt(&b, "statement %d: ", op->err_stmt);
  }
  if (prim) sb_str(&b, prim);
  else {
    char *m = msg_dup(PQresultErrorMessage(r));
    sb_str(&b, m);
    free(m);
  }
  if (lost) sb_str(&b, " (connection lost)");
  if (detail) { sb_str(&b, "\n  DETAIL: "); sb_str(&b, detail); }
  if (hint) { sb_str(&b, "\n  HINT: "); sb_str(&b, hint); }
  rbe_error_push(L, "pg", retryable_code(code) || lost, "%s",
                 b.p ? b.p : "error");
  free(b.p);
  if (code) rbe_error_code_str(L, code);
  else if (lost) rbe_error_code_str(L, "08006");
  set_field_str(L, "severity",
                PQresultErrorField(r, PG_DIAG_SEVERITY_NONLOCALIZED));
  set_field_str(L, "detail", detail);
  set_field_str(L, "hint", hint);
  if (pos) {
    lua_pushinteger(L, strtol(pos, NULL, 10));
    lua_setfield(L, -2, "position");
  }
  set_field_str(L, "schema", PQresultErrorField(r, PG_DIAG_SCHEMA_NAME));
  set_field_str(L, "table", PQresultErrorField(r, PG_DIAG_TABLE_NAME));
  set_field_str(L, "column", PQresultErrorField(r, PG_DIAG_COLUMN_NAME));
  set_field_str(L, "constraint",
                PQresultErrorField(r, PG_DIAG_CONSTRAINT_NAME));
  set_field_str(L, "datatype", PQresultErrorField(r, PG_DIAG_DATATYPE_NAME));
  set_field_str(L, "where", PQresultErrorField(r, PG_DIAG_CONTEXT));
  if (op->err_stmt > 0 && (op->nstmt > 1 || op->kind == OP_EXEC)) {
    lua_pushinteger(L, op->err_stmt);
    lua_setfield(L, -2, "statement");
  }
  int si = op->kind == OP_PIPELINE && op->err_stmt > 0 &&
           op->err_stmt <= op->nstmt ? op->err_stmt - 1 : 0;
  if (op->nstmt > 0) {
    sbuf s = {0};
    sb_snippet(&s, op->stmts[si].sql);
    set_field_str(L, "sql", s.p);
    free(s.p);
  }
}

/* Push the error of a finished request and free it. */
static int push_op_error(lua_State *L, void *ud) {
  pgop *op = ud;
  if (!L) { op_free(op); return 0; }
  if (op->err) {
    push_server_error(L, op);
  } else if (op->io_err) {
    rbe_error_push(L, "fs", 0, "%s: %s %s: %s", op->what, op->io_what,
                   op->path ? op->path : "", strerror(op->io_err));
    const char *nm = strerrorname_np(op->io_err);
    rbe_error_code_str(L, nm ? nm : "EIO");
  } else if (op->fail) {
    rbe_error_push(L, "pg", op->conn_bad, "%s: %s", op->what, op->fail);
    if (op->conn_bad) rbe_error_code_str(L, "08006");
  } else {
    rbe_error_push(L, "pg", 1, "%s: the connection was lost before the "
                   "request finished", op->what);
    rbe_error_code_str(L, "08006");
  }
  op_free(op);
  return 1;
}

static int push_op_result(lua_State *L, void *ud) {
  pgop *op = ud;
  if (!L) { op_free(op); return 0; }
  box *b = lua_newuserdatauv(L, sizeof *b, 0);
  b->op = op;
  luaL_setmetatable(L, BOX_MT);
  return 1;
}

static int box_gc(lua_State *L) {
  box *b = luaL_checkudata(L, 1, BOX_MT);
  if (b->op) op_free(b->op);
  b->op = NULL;
  return 0;
}

/* ---- requests on the wire ---- */

static int op_failed(pgop *op) {
  return op->err || op->fail || op->io_err ||
         (op->kind == OP_PIPELINE && !op->synced);
}

static void op_deliver(pgop *op) {
  rbe_wait *w = op->w;
  if (!w) { op_free(op); return; }
  op->w = NULL;
  if (op_failed(op)) rbe_wait_fail(w, push_op_error, op);
  else rbe_wait_done(w, push_op_result, op);
}

/* copy_out: flush, sync and move the file into place (or drop it). */
static void copy_out_finish(pgop *op) {
  if (op->fd < 0) return;
  if (!op->io_err && op->blen) {
    size_t off = 0;
    while (off < op->blen) {
      ssize_t n = write(op->fd, op->buf + off, op->blen - off);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) { op->io_err = errno; op->io_what = "cannot write"; break; }
      off += (size_t)n;
    }
    op->blen = 0;
  }
  if (!op->io_err && !op->err && !op->fail && fsync(op->fd) < 0) {
    op->io_err = errno;
    op->io_what = "cannot sync";
  }
  close(op->fd);
  op->fd = -1;
  if (!op->io_err && !op->err && !op->fail && op->tmp) {
    if (rename(op->tmp, op->path) < 0) {
      op->io_err = errno;
      op->io_what = "cannot rename the export to";
    } else {
      free(op->tmp);
      op->tmp = NULL;
    }
  }
}

/* The head request's wire work is over: unlink it and answer its task. */
static void op_complete(pgop *op) {
  pgconn *c = op->c;
  c->head = op->next;
  if (!c->head) c->tail = NULL;
  op->next = NULL;
  if (op->deadline) c->ntimed--;
  op->c = NULL;
  if ((op->kind == OP_COPY_OUT || op->kind == OP_COPY_IN) && !op->copied &&
      !op->err && !op->fail)
    op->fail = xstrdup(op->kind == OP_COPY_OUT
                       ? "the statement did not start COPY ... TO STDOUT"
                       : "the statement did not start COPY ... FROM STDIN");
  if (op->kind == OP_COPY_OUT) copy_out_finish(op);
  op_deliver(op);
}

/* Send the request.  0 sent; -1 failed (the connection's error message
 * says why); -2 failed halfway, the connection cannot be used again. */
static int op_send(pgop *op) {
  PGconn *pq = op->c->pq;
  stmt *s = op->stmts;
  int ok;
  switch (op->kind) {
    case OP_QUERY:
      ok = PQsendQueryParams(pq, s->sql, s->nparams, s->types, s->values,
                             s->lengths, s->formats, 0);
      break;
    case OP_PIPELINE:
      if (!PQenterPipelineMode(pq)) return -1;
      for (int i = 0; i < op->nstmt; i++) {
        s = &op->stmts[i];
        if (!PQsendQueryParams(pq, s->sql, s->nparams, s->types, s->values,
                               s->lengths, s->formats, 0)) {
          op->send_fatal = 1;
          return -2;
        }
      }
      if (!PQpipelineSync(pq)) { op->send_fatal = 1; return -2; }
      ok = 1;
      break;
    default:
      ok = PQsendQuery(pq, s->sql);
      break;
  }
  if (!ok) return -1;
  if (PQflush(pq) < 0) { op->send_fatal = 1; return -2; }
  return 0;
}

/* Reserve n bytes of the arena; returns the offset, or (size_t)-1. */
static size_t arena_take(pgop *op, size_t n) {
  n = (n + 7) & ~(size_t)7;
  if (op->alen + n > op->acap) {
    size_t cap = op->acap ? op->acap * 2 : 1024;
    while (cap < op->alen + n) cap *= 2;
    if (cap > UINT32_MAX) return (size_t)-1;
    char *p = realloc(op->arena, cap);
    if (!p) return (size_t)-1;
    op->arena = p;
    op->acap = cap;
  }
  size_t off = op->alen;
  op->alen += n;
  return off;
}

static size_t arena_str(pgop *op, const char *s, size_t n) {
  size_t off = arena_take(op, n + 1);
  if (off == (size_t)-1) return off;
  memcpy(op->arena + off, s, n);
  op->arena[off + n] = 0;
  return off;
}

/* Copy r into c (and the arena), then clear r; with tag_only, only its
 * command tag and count.  0, or -1 when out of memory. */
static int copy_result(pgop *op, cres *c, PGresult *r, int tag_only) {
  int nt = tag_only ? 0 : PQntuples(r), nf = tag_only ? 0 : PQnfields(r);
  memset(c, 0, sizeof *c);
  const char *tag = PQcmdStatus(r);
  c->affected = cmd_tuples(r);
  c->ntuples = nt;
  c->nfields = nf;
  size_t need = strlen(tag) + 1 + (size_t)nf * (sizeof(cfield) + 64) +
                (size_t)nt * (size_t)nf * sizeof(cvalue);
  if (op->alen + need > op->acap) {
    /* grow once for the bulk of it */
    size_t off = arena_take(op, need);
    if (off == (size_t)-1) goto oom;
    op->alen = off;
  }
  c->cmd = arena_str(op, tag, strlen(tag));
  c->fields = arena_take(op, (size_t)nf * sizeof(cfield));
  c->values = arena_take(op, (size_t)nt * (size_t)nf * sizeof(cvalue));
  if (c->cmd == (size_t)-1 || c->fields == (size_t)-1 ||
      c->values == (size_t)-1)
    goto oom;
  for (int j = 0; j < nf; j++) {
    const char *name = PQfname(r, j);
    size_t off = arena_str(op, name, strlen(name));
    if (off == (size_t)-1) goto oom;
    cfield *f = (cfield *)(op->arena + c->fields) + j;
    f->type = PQftype(r, j);
    f->name = (uint32_t)off;
  }
  for (int i = 0; i < nt; i++)
    for (int j = 0; j < nf; j++) {
      int isnull = PQgetisnull(r, i, j);
      int len = isnull ? 0 : PQgetlength(r, i, j);
      size_t off = isnull ? 0 : arena_str(op, PQgetvalue(r, i, j), (size_t)len);
      if (off == (size_t)-1) goto oom;
      cvalue *v = (cvalue *)(op->arena + c->values) + (size_t)i * (size_t)nf + (size_t)j;
      v->len = isnull ? -1 : len;
      v->off = (uint32_t)off;
    }
  c->present = 1;
  PQclear(r);
  return 0;
oom:
  PQclear(r);
  memset(c, 0, sizeof *c);
  return -1;
}

static void op_add_result(pgop *op, PGresult *r) {
  cres *c;
  if (op->kind == OP_PIPELINE) {
    if (op->cur >= op->nstmt || op->res[op->cur].present) { PQclear(r); return; }
    c = &op->res[op->cur];
  } else if (op->kind != OP_EXEC) {   /* one result: keep the last */
    c = &op->res[0];
    op->nres = 1;
  } else {
    if (op->nres == op->capres) {
      int cap = op->capres ? op->capres * 2 : 4;
      cres *p = realloc(op->res, (size_t)cap * sizeof *p);
      if (!p) {
        PQclear(r);
        if (!op->fail) op->fail = xstrdup("out of memory");
        return;
      }
      op->res = p;
      op->capres = cap;
    }
    c = &op->res[op->nres++];
  }
  if (copy_result(op, c, r, op->kind != OP_QUERY && op->kind != OP_PIPELINE) < 0 &&
      !op->fail)
    op->fail = xstrdup("out of memory (result too large)");
}

/* COPY ... TO STDOUT: move the rows that arrived into the file.  0: wait
 * for more input; 1: the copy is over (phase 2). */
static int copy_out_rows(pgop *op) {
  PGconn *pq = op->c->pq;
  for (;;) {
    char *row;
    int n = PQgetCopyData(pq, &row, 1);
    if (n == 0) return 0;
    if (n < 0) { op->phase = 2; return 1; }
    op->bytes += n;
    if (op->kind == OP_COPY_OUT && op->fd >= 0 && !op->io_err) {
      if (op->blen + (size_t)n > COPY_CHUNK) {
        size_t off = 0;
        while (off < op->blen) {
          ssize_t w = write(op->fd, op->buf + off, op->blen - off);
          if (w < 0 && errno == EINTR) continue;
          if (w < 0) { op->io_err = errno; op->io_what = "cannot write"; break; }
          off += (size_t)w;
        }
        op->blen = 0;
      }
      if (!op->io_err) {
        if ((size_t)n > COPY_CHUNK) {
          size_t off = 0;
          while (off < (size_t)n) {
            ssize_t w = write(op->fd, row + off, (size_t)n - off);
            if (w < 0 && errno == EINTR) continue;
            if (w < 0) { op->io_err = errno; op->io_what = "cannot write"; break; }
            off += (size_t)w;
          }
        } else {
          memcpy(op->buf + op->blen, row, (size_t)n);
          op->blen += (size_t)n;
        }
      }
    }
    PQfreemem(row);
  }
}

/* COPY ... FROM STDIN: feed the file.  0: wait until the socket takes
 * more; 1: the data is all sent (phase 2). */
static int copy_in_feed(pgop *op) {
  PGconn *pq = op->c->pq;
  for (;;) {
    if (op->kind != OP_COPY_IN || op->fail || op->abort || op->io_err ||
        op->fd < 0) {
      const char *why = op->io_err ? "rbe: reading the input file failed"
                      : op->kind != OP_COPY_IN
                        ? "rbe: use db:copy_in for COPY FROM STDIN"
                        : "rbe: the copy was cancelled";
      int r = PQputCopyEnd(pq, why);
      if (r == 0) return 0;
      op->phase = 2;
      return 1;
    }
    if (op->bpos == op->blen) {
      if (op->eof) {
        int r = PQputCopyEnd(pq, NULL);
        if (r == 0) return 0;
        op->phase = 2;
        return 1;
      }
      ssize_t n = read(op->fd, op->buf, COPY_CHUNK);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) { op->io_err = errno; op->io_what = "cannot read"; continue; }
      if (n == 0) { op->eof = 1; continue; }
      op->blen = (size_t)n;
      op->bpos = 0;
    }
    int r = PQputCopyData(pq, op->buf + op->bpos, (int)(op->blen - op->bpos));
    if (r < 0) { op->phase = 2; return 1; }
    if (r == 0) return 0;
    op->bytes += (long long)(op->blen - op->bpos);
    op->bpos = op->blen;
    int f = PQflush(pq);
    if (f < 0) { op->phase = 2; return 1; }
    if (f == 1) return 0;
  }
}

/* Take whatever results are complete.  1 when the request is over. */
static int op_step(pgop *op) {
  PGconn *pq = op->c->pq;
  for (;;) {
    if (op->phase == 1) {
      int r = op->copying == 2 ? copy_in_feed(op) : copy_out_rows(op);
      if (!r) return 0;
      continue;
    }
    if (PQisBusy(pq)) return 0;
    PGresult *r = PQgetResult(pq);
    if (!r) {
      if (op->kind != OP_PIPELINE) return 1;
      if (PQstatus(pq) == CONNECTION_BAD) return 1;
      op->cur++;
      continue;
    }
    switch (PQresultStatus(r)) {
      case PGRES_PIPELINE_SYNC:
        PQclear(r);
        op->synced = 1;
        PQexitPipelineMode(pq);
        return 1;
      case PGRES_PIPELINE_ABORTED:
        PQclear(r);
        break;
      case PGRES_COPY_OUT:
      case PGRES_COPY_IN: {
        int in = PQresultStatus(r) == PGRES_COPY_IN;
        PQclear(r);
        int want = in ? OP_COPY_IN : OP_COPY_OUT;
        if (op->kind != want && !op->fail)
          op->fail = xstrdup(in ? "the statement started COPY FROM STDIN; "
                                  "use db:copy_in(sql, path) for that"
                                : "the statement started COPY TO STDOUT; "
                                  "use db:copy_out(sql, path) for that");
        op->copying = in ? 2 : 1;
        op->copied = 1;
        op->phase = 1;
        break;
      }
      case PGRES_COPY_BOTH:
        PQclear(r);
        if (!op->fail) op->fail = xstrdup("COPY BOTH is not supported");
        op->send_fatal = 1;
        return 1;
      case PGRES_FATAL_ERROR:
        if (!op->err) {
          op->err = r;
          op->err_stmt = op->kind == OP_EXEC ? op->nres + 1 : op->cur + 1;
        } else {
          PQclear(r);
        }
        break;
      default:
        op_add_result(op, r);
        break;
    }
  }
}

/* Send the next requests while nothing is on the wire. */
static void pump(pgconn *c) {
  while (c->state == CS_READY && !c->ncancel) {
    pgop *op = c->head;
    if (!op || op->state != OPS_QUEUED) return;
    int r = op_send(op);
    if (r == 0) { op->state = OPS_SENT; return; }
    if (r == -2 || PQstatus(c->pq) == CONNECTION_BAD) {
      conn_lost(c, PQerrorMessage(c->pq));
      return;
    }
    op->fail = msg_dup(PQerrorMessage(c->pq));
    op_complete(op);
  }
}

static void take_notifies(pgconn *c) {
  PGnotify *n;
  while (c->pq && (n = PQnotifies(c->pq))) {
    size_t cl = strlen(n->relname), pl = strlen(n->extra ? n->extra : "");
    notif *nt = malloc(sizeof *nt + cl + 1 + pl + 1);
    if (nt) {
      nt->next = NULL;
      nt->pid = n->be_pid;
      memcpy(nt->channel, n->relname, cl + 1);
      nt->payload = nt->channel + cl + 1;
      memcpy(nt->payload, n->extra ? n->extra : "", pl + 1);
    }
    PQfreemem(n);
    if (!nt) continue;
    lwait *lw = c->lwaits;
    while (lw && lw->channel[0] && strcmp(lw->channel, nt->channel) != 0)
      lw = lw->next;
    if (lw) {
      if (lw->prev) lw->prev->next = lw->next;
      else c->lwaits = lw->next;
      if (lw->next) lw->next->prev = lw->prev;
      if (lw->deadline) c->ntimed--;
      rbe_wait_done(lw->w, push_notif_fn, nt);
      free(lw);
      continue;
    }
    if (c->nnotif == MAX_NOTIFS) {
      notif *old = c->nhead;
      c->nhead = old->next;
      free(old);
      c->nnotif--;
      c->ndropped++;
      if (!c->nhead) c->ntail = NULL;
    }
    if (c->ntail) c->ntail->next = nt;
    else c->nhead = nt;
    c->ntail = nt;
    c->nnotif++;
  }
}

static void process(pgconn *c) {
  while (c->state == CS_READY) {
    pgop *op = c->head;
    if (!op || op->state != OPS_SENT) break;
    if (!op_step(op)) break;
    op->conn_bad = PQstatus(c->pq) == CONNECTION_BAD;
    if (op->send_fatal) {
      conn_lost(c, op->fail ? op->fail : PQerrorMessage(c->pq));
      return;
    }
    op_complete(op);
    pump(c);
  }
  if (c->state != CS_READY) return;
  take_notifies(c);
  if (PQstatus(c->pq) == CONNECTION_BAD) {
    conn_lost(c, PQerrorMessage(c->pq));
    return;
  }
  poll_update(c);
}

static void poll_cb(uv_poll_t *h, int status, int events) {
  pgconn *c = h->data;
  if (c->state == CS_CONNECTING) {
    connect_step(c);
    return;
  }
  if (c->state != CS_READY) return;
  if (status < 0) { conn_lost(c, uv_strerror(status)); return; }
  int ok = 1;
  if (events & UV_READABLE) ok = PQconsumeInput(c->pq);
  process(c);
  if (!ok && c->state == CS_READY) conn_lost(c, PQerrorMessage(c->pq));
}

/* ---- failing everything: lost or closed connections ---- */

static void fail_queue(pgconn *c, pgop **head, pgop **tail, int lost,
                       const char *why) {
  while (*head) {
    pgop *op = *head;
    *head = op->next;
    if (!*head) *tail = NULL;
    op->next = NULL;
    if (op->deadline) c->ntimed--;
    op->c = NULL;
    rbe_wait *w = op->w;
    op->w = NULL;
    if (w && lost && op->state == OPS_SENT && op->err) {
      /* the server said why (57P01 terminating connection, ...) */
      op->conn_bad = 1;
      rbe_wait_fail(w, push_op_error, op);
      continue;
    }
    if (w) {
      const char *when = op->state == OPS_SENT ? "running" : "waiting";
      if (lost)
        fail_with(w, "pg", "08006", 1, "%s: connection to %s lost while the "
                  "request was %s: %s", op->what, c->desc, when, why);
      else
        fail_with(w, "pg", "08003", 0, "%s: connection to %s was closed "
                  "while the request was %s", op->what, c->desc, when);
    }
    op_free(op);
  }
}

static void fail_all(pgconn *c, int lost, const char *why) {
  fail_queue(c, &c->head, &c->tail, lost, why);
  fail_queue(c, &c->bhead, &c->btail, lost, why);
  while (c->lwaits) {
    lwait *lw = c->lwaits;
    c->lwaits = lw->next;
    if (lw->deadline) c->ntimed--;
    if (lost)
      fail_with(lw->w, "pg", "08006", 1, "db:listen: connection to %s lost: "
                "%s", c->desc, why);
    else
      fail_with(lw->w, "pg", "08003", 0, "db:listen: connection to %s was "
                "closed", c->desc);
    free(lw);
  }
  c->lock_token = 0;
  c->lock_task = NULL;
}

static void conn_lost(pgconn *c, const char *why) {
  if (c->state != CS_READY) return;
  c->state = CS_BROKEN;
  char *m = msg_dup(why);
  c->broken = m ? m : xstrdup("connection lost");
  release_io(c);
  fail_all(c, 1, c->broken ? c->broken : "connection lost");
}

/* Close: a request on the wire is cancelled on the server (the cancel
 * request needs no PGconn, so the connection is dropped at once). */
static void conn_close(pgconn *c) {
  if (c->state == CS_CLOSED) return;
  if (c->state == CS_READY && c->head && c->head->state == OPS_SENT)
    start_cancel(c);
  c->state = CS_CLOSED;
  fail_all(c, 0, NULL);
  release_io(c);
  c->connect_w = NULL;
  maybe_free(c);
}

/* ---- timeouts ---- */

static void op_abandon(pgop *op);

static void expire(pgconn *c, uint64_t now) {
  char secs[32];
  pgop **queues[2][2] = {{&c->head, &c->tail}, {&c->bhead, &c->btail}};
  for (int q = 0; q < 2; q++) {
    pgop *op = *queues[q][0];
    while (op) {
      pgop *next = op->next;
      if (op->w && op->deadline && op->deadline <= now) {
        rbe_wait *w = op->w;
        op->w = NULL;
        sbuf b = {0};
        sb_snippet(&b, op->nstmt ? op->stmts[0].sql : NULL);
        fail_with(w, "timeout", "ETIMEDOUT", 1, "%s: timed out after %s%s: "
                  "%s", op->what, fmt_secs(secs, sizeof secs, op->timeout),
                  op->state == OPS_SENT ? " (cancelled on the server)"
                  : q == 1 ? " (waiting for a transaction on this "
                             "connection to end)"
                           : " (queued behind other requests on this "
                             "connection)",
                  b.p ? b.p : "");
        free(b.p);
        op_abandon(op);
        if (c->state != CS_READY) return;
      }
      op = next;
    }
  }
  lwait *lw = c->lwaits;
  while (lw) {
    lwait *next = lw->next;
    if (lw->deadline && lw->deadline <= now) {
      if (lw->prev) lw->prev->next = lw->next;
      else c->lwaits = lw->next;
      if (lw->next) lw->next->prev = lw->prev;
      c->ntimed--;
      fail_with(lw->w, "timeout", "ETIMEDOUT", 1, "db:listen: no "
                "notification%s%s within %s", lw->channel[0] ? " on " : "",
                lw->channel, fmt_secs(secs, sizeof secs, lw->timeout));
      free(lw);
    }
    lw = next;
  }
}

static void timer_cb(uv_timer_t *t) {
  pgconn *c = t->data;
  uint64_t now = uv_now(rbe_loop());
  if (c->state == CS_CONNECTING || c->state == CS_RESOLVING) {
    if (now >= c->connect_deadline) {
      char secs[32], msg[DESC_MAX + 100];
      snprintf(msg, sizeof msg, "pg.connect: no connection to %s within %s",
               c->desc, fmt_secs(secs, sizeof secs, c->connect_timeout));
      connect_fail(c, "timeout", "ETIMEDOUT", 1, msg);
    } else {
      timer_arm(c);
    }
    return;
  }
  if (c->state != CS_READY) return;
  if (c->kicked) {
    c->kicked = 0;
    pgop *op = c->head;
    if (op && op->state == OPS_SEND_FAILED) {
      if (op->send_fatal || PQstatus(c->pq) == CONNECTION_BAD) {
        conn_lost(c, PQerrorMessage(c->pq));
        return;
      }
      op->fail = msg_dup(PQerrorMessage(c->pq));
      op_complete(op);
      pump(c);
    }
    process(c);
    if (c->state != CS_READY) return;
  }
  if (c->ntimed) expire(c, now);
  if (c->state == CS_READY) {
    timer_arm(c);
    update_ref(c);
  }
}

/* Its task stopped waiting for op (timeout or cancelled task). */
static void op_abandon(pgop *op) {
  pgconn *c = op->c;
  if (op->kind == OP_LOCK || op->state == OPS_QUEUED) {
    if (!q_remove(&c->head, &c->tail, op))
      q_remove(&c->bhead, &c->btail, op);
    if (op->deadline) c->ntimed--;
    op_free(op);
    update_ref(c);
    return;
  }
  if (op->state == OPS_SEND_FAILED) return;     /* the kick frees it */
  if (op->kind == OP_COPY_IN && op->phase == 1) {
    op->abort = 1;
    kick(c);
    return;
  }
  start_cancel(c);
}

static void op_cancel(void *ud) {
  pgop *op = ud;
  op->w = NULL;
  op_abandon(op);
}

/* ---- connecting ---- */

static void connect_ok(pgconn *c) {
  rbe_wait *w = c->connect_w;
  c->connect_w = NULL;
  c->state = CS_READY;
  free_secrets(c);
  PQsetnonblocking(c->pq, 1);
  if (poll_watch(c, PQsocket(c->pq), UV_READABLE) < 0) {
    c->state = CS_CLOSED;
    fail_with(w, "pg", "08001", 1, "pg.connect: %s: cannot watch the "
              "connection's socket", c->desc);
    release_io(c);
    return;
  }
  timer_arm(c);
  update_ref(c);
  rbe_wait_done(w, rbe_push_nothing, NULL);
}

static void connect_fail(pgconn *c, const char *kind, const char *code,
                         int retry, const char *msg) {
  rbe_wait *w = c->connect_w;
  c->connect_w = NULL;
  char *m = scrub(msg, c->secrets, c->nsecrets);
  if (w) rbe_wait_fail(w, push_emsg, emsg_new(kind, code, retry,
                                              m ? m : "pg.connect failed"));
  free(m);
  conn_close(c);
}

/* SQLSTATE and retryability of a failed connection attempt (libpq gives
 * only a message). */
static void classify(const char *msg, const char **code, int *retry) {
  static const struct { const char *needle, *code; int retry; } map[] = {
    {"password authentication failed", "28P01", 0},
    {"no password supplied", "28P01", 0},
    {"no pg_hba.conf entry", "28000", 0},
    {"role \"", "28000", 0},
    {"database \"", "3D000", 0},
    {"the database system is starting up", "57P03", 1},
    {"the database system is shutting down", "57P03", 1},
    {"the database system is in recovery", "57P03", 1},
    {"too many clients", "53300", 1},
    {"remaining connection slots", "53300", 1},
    {"SSL", "08P01", 0},
  };
  for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
    if (strstr(msg, map[i].needle) &&
        (map[i].code[0] != '2' || map[i].code[1] != '8' ||
         strstr(msg, "does not exist") || strstr(msg, "auth") ||
         strstr(msg, "pg_hba") || strstr(msg, "password"))) {
      if (strcmp(map[i].code, "3D000") == 0 && !strstr(msg, "does not exist"))
        continue;
      *code = map[i].code;
      *retry = map[i].retry;
      return;
    }
  *code = "08001";
  *retry = 1;
}

static void connect_step(pgconn *c) {
  PostgresPollingStatusType st = PQconnectPoll(c->pq);
  if (st == PGRES_POLLING_OK) { connect_ok(c); return; }
  if (st == PGRES_POLLING_FAILED) {
    char *m = msg_dup(PQerrorMessage(c->pq));
    const char *code;
    int retry;
    classify(m ? m : "", &code, &retry);
    char msg[2048];
    snprintf(msg, sizeof msg, "pg.connect: cannot connect to %s: %s",
             c->desc, m ? m : "unknown error");
    free(m);
    connect_fail(c, "pg", code, retry, msg);
    return;
  }
  int ev = st == PGRES_POLLING_READING ? UV_READABLE : UV_WRITABLE;
  int r = poll_watch(c, PQsocket(c->pq), ev);
  if (r < 0) {
    char msg[DESC_MAX + 100];
    snprintf(msg, sizeof msg, "pg.connect: %s: cannot watch the socket: %s",
             c->desc, uv_strerror(r));
    connect_fail(c, "pg", "08001", 1, msg);
  }
}

static void connect_cancel(void *ud) {
  pgconn *c = ud;
  c->connect_w = NULL;
  conn_close(c);
}

static void make_desc(pgconn *c) {
  const char *user = PQuser(c->pq), *host = PQhost(c->pq),
             *port = PQport(c->pq), *db = PQdb(c->pq), *pass = PQpass(c->pq);
  int sock = host && host[0] == '/';
  snprintf(c->desc, sizeof c->desc, "postgresql://%s%s@%s%s%s:%s/%s",
           user ? user : "", pass && *pass ? ":***" : "", sock ? "[" : "",
           host && *host ? host : "localhost", sock ? "]" : "",
           port && *port ? port : "5432", db ? db : "");
}

static void notice_cb(void *arg, const char *msg) {
  pgconn *c = arg;
  if (c->nnotices == MAX_NOTICES) {
    free(c->notices[0]);
    memmove(c->notices, c->notices + 1, (MAX_NOTICES - 1) * sizeof(char *));
    c->nnotices--;
  }
  char *m = msg_dup(msg);
  if (m) c->notices[c->nnotices++] = m;
}

static int is_keyword(lua_State *L, const char *k) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &kw_key);
  lua_getfield(L, -1, k);
  int ok = lua_toboolean(L, -1);
  lua_pop(L, 2);
  return ok;
}

typedef struct {
  const char **kw, **val;
  int n, max;
  double connect_timeout, timeout;
  int has_app, has_ct;
  const char *passwords[3];
  int npass;
} cparams;

/* Add the connection parameters of the table at idx (keys are libpq
 * keywords or rbe options); strings are anchored in the holder at hidx. */
static void add_params(lua_State *L, int idx, cparams *p, int hidx) {
  idx = lua_absindex(L, idx);
  int hn = (int)lua_rawlen(L, hidx);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -2) != LUA_TSTRING)
      luaL_error(L, "pg.connect: option names must be strings");
    const char *k = lua_tostring(L, -2);
    if (strcmp(k, "timeout") == 0) {
      p->timeout = rbe_check_duration(L, -1, "pg.connect: timeout");
    } else if (strcmp(k, "connect_timeout") == 0) {
      p->connect_timeout = rbe_check_duration(L, -1,
                                              "pg.connect: connect_timeout");
      p->has_ct = 1;
    } else if (!is_keyword(L, k)) {
      luaL_error(L, "pg.connect: unknown option '%s' (neither a libpq "
                 "connection parameter nor timeout/connect_timeout)", k);
    } else {
      rbe_push_revealed(L, -1);
      if (lua_type(L, -1) == LUA_TBOOLEAN) {
        lua_pushstring(L, lua_toboolean(L, -1) ? "1" : "0");
        lua_remove(L, -2);
      }
      if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
        luaL_error(L, "pg.connect: option '%s' must be a string or a "
                   "number, got %s", k, luaL_typename(L, -1));
      const char *v = lua_tostring(L, -1);
      lua_pushvalue(L, -1);
      lua_rawseti(L, hidx, ++hn);
      lua_pushvalue(L, -3);
      lua_rawseti(L, hidx, ++hn);
      if (p->n + 3 >= p->max) luaL_error(L, "pg.connect: too many options");
      p->kw[p->n] = k;
      p->val[p->n] = v;
      p->n++;
      if (strcmp(k, "application_name") == 0) p->has_app = 1;
      if (strcmp(k, "password") == 0 && p->npass < 3)
        p->passwords[p->npass++] = v;
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
}

static int count_keys(lua_State *L, int idx) {
  int n = 0;
  if (!lua_istable(L, idx)) return 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) { n++; lua_pop(L, 1); }
  return n;
}

static int connect_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  rbe_wait_values(L, ctx);
  lua_pushvalue(L, 3);
  return 1;
}

/* Start libpq's connection attempt.  0; or -1 with a message in *err
 * (malloc'd, secrets scrubbed) and no libpq connection left. */
static int begin_connect(pgconn *c, const char *const *kw,
                         const char *const *val, char **err) {
  c->pq = PQconnectStartParams(kw, val, 1);
  if (!c->pq) { *err = xstrdup("out of memory"); return -1; }
  add_secret(c, PQpass(c->pq));
  make_desc(c);
  if (PQstatus(c->pq) == CONNECTION_BAD) {
    char *m = msg_dup(PQerrorMessage(c->pq));
    *err = scrub(m ? m : "", c->secrets, c->nsecrets);
    free(m);
    PQfinish(c->pq);
    c->pq = NULL;
    return -1;
  }
  PQsetNoticeProcessor(c->pq, notice_cb, c);
  c->state = CS_CONNECTING;
  int r = poll_watch(c, PQsocket(c->pq), UV_WRITABLE);
  if (r < 0) {
    char tmp[200];
    snprintf(tmp, sizeof tmp, "cannot watch the socket: %s", uv_strerror(r));
    *err = xstrdup(tmp);
    PQfinish(c->pq);
    c->pq = NULL;
    return -1;
  }
  return 0;
}

static int is_ip(const char *h) {
  unsigned char buf[16];
  return inet_pton(AF_INET, h, buf) == 1 || inet_pton(AF_INET6, h, buf) == 1;
}

/* The host name resolved (thread pool): connect to its addresses, giving
 * libpq host (for TLS and .pgpass) plus hostaddr (no lookup of its own). */
static void gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  pgconn *c = req->data;
  free(req);
  c->gai = NULL;
  c->handles--;
  rbe_counts[RBE_COUNT_HANDLES]--;
  if (c->state != CS_RESOLVING) {
    if (res) uv_freeaddrinfo(res);
    maybe_free(c);
    return;
  }
  const char *host = c->cval[c->nkw - 1];
  char msg[DESC_MAX + 300];
  if (status < 0) {
    snprintf(msg, sizeof msg, "pg.connect: cannot resolve host '%s': %s",
             host, uv_strerror(status));
    connect_fail(c, "pg", "08001", status == UV_EAI_AGAIN, msg);
    return;
  }
  sbuf addrs = {0}, hosts = {0};
  int n = 0;
  for (struct addrinfo *ai = res; ai && n < 16; ai = ai->ai_next) {
    char ip[INET6_ADDRSTRLEN];
    const void *a = ai->ai_family == AF_INET
      ? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
      : ai->ai_family == AF_INET6
      ? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr : NULL;
    if (!a || !inet_ntop(ai->ai_family, a, ip, sizeof ip)) continue;
    int dup = 0;
    for (const char *p = addrs.p; p && *p && !dup; ) {
      size_t l = strcspn(p, ",");
      dup = l == strlen(ip) && strncmp(p, ip, l) == 0;
      p += l + (p[l] == ',');
    }
    if (dup) continue;
    if (n) { sb_str(&addrs, ","); sb_str(&hosts, ","); }
    sb_str(&addrs, ip);
    sb_str(&hosts, host);
    n++;
  }
  uv_freeaddrinfo(res);
  const char **kw = malloc(sizeof(char *) * (size_t)(c->nkw + 2));
  const char **val = malloc(sizeof(char *) * (size_t)(c->nkw + 2));
  char *err = NULL;
  int r = -1;
  if (!n) err = xstrdup("the host name has no IPv4 or IPv6 address");
  else if (!kw || !val || addrs.oom || hosts.oom) err = xstrdup("out of memory");
  else {
    /* the last pair was the host; it becomes host + hostaddr lists */
    for (int i = 0; i < c->nkw - 1; i++) { kw[i] = c->ckw[i]; val[i] = c->cval[i]; }
    kw[c->nkw - 1] = "host";
    val[c->nkw - 1] = hosts.p;
    kw[c->nkw] = "hostaddr";
    val[c->nkw] = addrs.p;
    kw[c->nkw + 1] = val[c->nkw + 1] = NULL;
    r = begin_connect(c, kw, val, &err);
  }
  free(kw);
  free(val);
  free(addrs.p);
  free(hosts.p);
  free_kw(c);
  if (r < 0) {
    snprintf(msg, sizeof msg, "pg.connect: %s: %s", c->desc,
             err ? err : "out of memory");
    free(err);
    connect_fail(c, "pg", "08001", 0, msg);
    return;
  }
  timer_arm(c);
}

/* Which host libpq would look up by name (NULL: none, or several). */
static const char *dns_host(const char *host, const char *hostaddr) {
  if (!host || !*host || (hostaddr && *hostaddr)) return NULL;
  if (host[0] == '/' || host[0] == '@' || strchr(host, ',')) return NULL;
  if (is_ip(host)) return NULL;
  return host;
}

/* pg.core.connect(url_or_params, opts) -> conn  [yields]
 * url: postgresql://... or a key=value string ("" or nil: libpq's
 * defaults and PG* variables); params and opts: libpq keywords plus
 * timeout (per request) and connect_timeout (durations).  A host name is
 * resolved on the thread pool first (libpq would block on it). */
static int l_connect(lua_State *L) {
  lua_settop(L, 2);
  conn_ud *u = lua_newuserdatauv(L, sizeof *u, 0);   /* 3 */
  u->c = NULL;
  luaL_setmetatable(L, CONN_MT);
  lua_newtable(L);                                    /* 4: holder */
  int t1 = lua_type(L, 1);
  const char *url = NULL;
  if (t1 == LUA_TSTRING || luaL_testudata(L, 1, RBE_SECRET_MT)) {
    rbe_push_revealed(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING)
      return luaL_error(L, "pg.connect: URL must be a string");
    url = lua_tostring(L, -1);
    lua_rawseti(L, 4, 1);
  } else if (t1 != LUA_TTABLE && t1 != LUA_TNIL) {
    return luaL_error(L, "pg.connect: postgresql:// URL or table of "
                      "connection parameters expected, got %s",
                      luaL_typename(L, 1));
  }
  if (!lua_isnil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);

  cparams p;
  memset(&p, 0, sizeof p);
  p.connect_timeout = CONNECT_TIMEOUT;
  p.max = count_keys(L, 1) + count_keys(L, 2) + 8;
  p.kw = lua_newuserdatauv(L, sizeof(char *) * (size_t)p.max, 0);
  p.val = lua_newuserdatauv(L, sizeof(char *) * (size_t)p.max, 0);
  char rawpw[256] = "";
  const char *host = NULL, *hostaddr = NULL;
  if (url && *url) {
    int is_url = strncmp(url, "postgresql://", 13) == 0 ||
                 strncmp(url, "postgres://", 11) == 0;
    if (!is_url && !strchr(url, '='))
      return luaL_error(L, "pg.connect: expected a postgresql:// URL or a "
                        "key=value connection string, got '%s'", url);
    if (is_url) url_password(url, rawpw, sizeof rawpw);
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse(url, &err);
    if (!opts) {
      char *secrets[2] = {rawpw, NULL};
      char *m = scrub(err ? err : "out of memory", secrets, 1);
      char *shown = scrub(url, secrets, 1);
      if (err) PQfreemem(err);
      if (m) { size_t n = strlen(m); while (n && m[n - 1] == '\n') m[--n] = 0; }
      lua_pushfstring(L, "pg.connect: bad connection string '%s': %s",
                      shown ? shown : "?", m ? m : "?");
      free(m);
      free(shown);
      return lua_error(L);
    }
    int hn = 1;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
      if (!o->val) continue;
      int k = strcmp(o->keyword, "password") == 0 ? 1
            : strcmp(o->keyword, "host") == 0 ? 2
            : strcmp(o->keyword, "hostaddr") == 0 ? 3 : 0;
      if (k) {
        lua_pushstring(L, o->val);
        const char *v = lua_tostring(L, -1);
        lua_rawseti(L, 4, ++hn);
        if (k == 1) p.passwords[p.npass++] = v;
        else if (k == 2) host = v;
        else hostaddr = v;
      } else if (strcmp(o->keyword, "connect_timeout") == 0) {
        double v = strtod(o->val, NULL);
        if (v > 0) p.connect_timeout = v;
      } else if (strcmp(o->keyword, "application_name") == 0) {
        p.has_app = 1;
      }
    }
    PQconninfoFree(opts);
    p.kw[p.n] = "dbname";
    p.val[p.n] = url;
    p.n++;
  }
  if (t1 == LUA_TTABLE) add_params(L, 1, &p, 4);
  if (!lua_isnil(L, 2)) add_params(L, 2, &p, 4);
  if (!p.has_app) {
    p.kw[p.n] = "fallback_application_name";
    p.val[p.n] = "rbe";
    p.n++;
  }
  for (int i = 0; i < p.n; i++) {
    if (strcmp(p.kw[i], "host") == 0) host = p.val[i];
    else if (strcmp(p.kw[i], "hostaddr") == 0) hostaddr = p.val[i];
  }
  if (!host) host = getenv("PGHOST");
  if (!hostaddr) hostaddr = getenv("PGHOSTADDR");
  const char *dns = dns_host(host, hostaddr);
  p.kw[p.n] = NULL;
  p.val[p.n] = NULL;

  rbe_wait *w = rbe_wait_new(L, "pg.connect");
  pgconn *c = calloc(1, sizeof *c);
  uv_timer_t *timer = malloc(sizeof *timer);
  uv_getaddrinfo_t *gai = dns ? malloc(sizeof *gai) : NULL;
  if (c && dns) {
    /* keep a copy of the parameters, the host last, for gai_cb */
    c->ckw = calloc((size_t)p.n + 1, sizeof(char *));
    c->cval = calloc((size_t)p.n + 1, sizeof(char *));
    if (c->ckw && c->cval) {
      for (int i = 0; i < p.n; i++) {
        c->ckw[c->nkw] = xstrdup(p.kw[i]);
        c->cval[c->nkw] = xstrdup(p.val[i]);
        c->nkw++;
      }
      c->ckw[c->nkw] = xstrdup("host");
      c->cval[c->nkw] = xstrdup(dns);
      c->nkw++;
    }
  }
  int oom = !c || !timer || (dns && !gai);
  for (int i = 0; c && !oom && dns && i < p.n + 1; i++)
    oom = !c->ckw || !c->cval || !c->ckw[i] || !c->cval[i];
  if (oom) {
    if (c) free_kw(c);
    free(c);
    free(timer);
    free(gai);
    return luaL_error(L, "pg.connect: out of memory");
  }
  c->poll_fd = -1;
  for (int i = 0; i < p.npass; i++) add_secret(c, p.passwords[i]);
  add_secret(c, rawpw);
  if (dns) {
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    gai->data = c;
    int r = uv_getaddrinfo(rbe_loop(), gai, gai_cb, dns, NULL, &hints);
    if (r < 0) {
      free_kw(c);
      free_secrets(c);
      free(c);
      free(timer);
      free(gai);
      rbe_error_push(L, "pg", 1, "pg.connect: cannot resolve host '%s': %s",
                     dns, uv_strerror(r));
      rbe_error_code_str(L, "08001");
      return lua_error(L);
    }
    c->gai = gai;
    c->handles++;
    rbe_counts[RBE_COUNT_HANDLES]++;
    c->state = CS_RESOLVING;
    snprintf(c->desc, sizeof c->desc, "host %s", dns);
  } else {
    char *err = NULL;
    if (begin_connect(c, p.kw, p.val, &err) < 0) {
      free_secrets(c);
      rbe_error_push(L, "pg", 0, "pg.connect: %s: %s", c->desc,
                     err ? err : "out of memory");
      free(err);
      free(c);
      free(timer);
      rbe_error_code_str(L, "08001");
      return lua_error(L);
    }
  }
  /* past this point nothing raises */
  uv_timer_init(rbe_loop(), timer);
  timer->data = c;
  c->timer = timer;
  c->handles++;
  rbe_counts[RBE_COUNT_HANDLES]++;
  S.conns++;
  u->c = c;
  c->owned = 1;
  c->timeout = p.timeout;
  c->connect_timeout = p.connect_timeout;
  c->connect_deadline = uv_now(rbe_loop()) + rbe_duration_ms(p.connect_timeout);
  c->connect_w = w;
  update_ref(c);
  timer_arm(c);
  return rbe_wait_yieldk(L, w, connect_cancel, c, connect_k);
}

/* ---- parameters ---- */

static int ident_char(unsigned char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
         (ch >= '0' && ch <= '9') || ch == '_' || ch == '$' || ch >= 0x80;
}

/* The highest $n placeholder of a statement, skipping string literals,
 * quoted identifiers, comments and dollar-quoted bodies. */
static int count_params(const char *s, size_t n) {
  int max = 0;
  size_t i = 0;
  while (i < n) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '\'') {
      int esc = i > 0 && (s[i - 1] == 'E' || s[i - 1] == 'e') &&
                (i < 2 || !ident_char((unsigned char)s[i - 2]));
      i++;
      while (i < n) {
        if (esc && s[i] == '\\') { i += 2; continue; }
        if (s[i] == '\'') {
          if (i + 1 < n && s[i + 1] == '\'') { i += 2; continue; }
          break;
        }
        i++;
      }
      i++;
    } else if (ch == '"') {
      i++;
      while (i < n && s[i] != '"') i++;
      i++;
    } else if (ch == '-' && i + 1 < n && s[i + 1] == '-') {
      while (i < n && s[i] != '\n') i++;
    } else if (ch == '/' && i + 1 < n && s[i + 1] == '*') {
      int depth = 1;
      i += 2;
      while (i < n && depth) {
        if (s[i] == '/' && i + 1 < n && s[i + 1] == '*') { depth++; i += 2; }
        else if (s[i] == '*' && i + 1 < n && s[i + 1] == '/') { depth--; i += 2; }
        else i++;
      }
    } else if (ch == '$') {
      if (i > 0 && ident_char((unsigned char)s[i - 1])) { i++; continue; }
      if (i + 1 < n && s[i + 1] >= '0' && s[i + 1] <= '9') {
        long v = 0;
        i++;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
          if (v <= MAX_PARAMS) v = v * 10 + (s[i] - '0');
          i++;
        }
        if (v > max) max = v > MAX_PARAMS ? MAX_PARAMS + 1 : (int)v;
        continue;
      }
      size_t j = i + 1;
      while (j < n && (ident_char((unsigned char)s[j]) && s[j] != '$')) j++;
      if (j < n && s[j] == '$') {
        size_t tl = j - i + 1;
        const char *tag = s + i;
        size_t k = j + 1;
        while (k + tl <= n && memcmp(s + k, tag, tl) != 0) k++;
        i = k + tl <= n ? k + tl : n;
        continue;
      }
      i++;
    } else {
      i++;
    }
  }
  return max;
}

static int utf8_valid(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned char c = s[i];
    if (c < 0x80) {
      if (!c) return 0;
      i++;
      continue;
    }
    int k = c >= 0xC2 && c <= 0xDF ? 1 : c >= 0xE0 && c <= 0xEF ? 2
          : c >= 0xF0 && c <= 0xF4 ? 3 : 0;
    if (!k || i + (size_t)k >= n) return 0;
    for (int j = 1; j <= k; j++)
      if ((s[i + j] & 0xC0) != 0x80) return 0;
    i += (size_t)k + 1;
  }
  return 1;
}

/* Shortest %g form that reads back as the same double. */
static int fmt_double(char *buf, size_t n, double v) {
  if (isnan(v)) return snprintf(buf, n, "NaN");
  if (isinf(v)) return snprintf(buf, n, v > 0 ? "Infinity" : "-Infinity");
  for (int prec = 15; prec <= 17; prec++) {
    snprintf(buf, n, "%.*g", prec, v);
    if (strtod(buf, NULL) == v) break;
  }
  return (int)strlen(buf);
}

/* -- JSON encoding of table parameters -- */

typedef struct { char *p; size_t n, cap; } jbuf;

static int jbuf_gc(lua_State *L) {
  jbuf *b = luaL_checkudata(L, 1, JBUF_MT);
  free(b->p);
  b->p = NULL;
  return 0;
}

static void jb_add(lua_State *L, jbuf *b, const char *s, size_t n) {
  if (b->n + n > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 256;
    while (cap < b->n + n) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) luaL_error(L, "out of memory");
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
}

static void jb_string(lua_State *L, jbuf *b, const char *s, size_t n) {
  jb_add(L, b, "\"", 1);
  size_t run = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    const char *esc = NULL;
    char tmp[8];
    if (ch == '"') esc = "\\\"";
    else if (ch == '\\') esc = "\\\\";
    else if (ch == '\n') esc = "\\n";
    else if (ch == '\r') esc = "\\r";
    else if (ch == '\t') esc = "\\t";
    else if (ch < 0x20) { snprintf(tmp, sizeof tmp, "\\u%04x", ch); esc = tmp; }
    if (!esc) continue;
    jb_add(L, b, s + run, i - run);
    jb_add(L, b, esc, strlen(esc));
    run = i + 1;
  }
  jb_add(L, b, s + run, n - run);
  jb_add(L, b, "\"", 1);
}

static int is_null(lua_State *L, int idx) {
  if (lua_islightuserdata(L, idx) && !lua_touserdata(L, idx)) return 1;
  rbe_push_null(L);
  int eq = lua_rawequal(L, idx, -1);
  lua_pop(L, 1);
  return eq;
}

static void jb_value(lua_State *L, jbuf *b, int idx, int depth,
                     const char *what) {
  char tmp[64];
  idx = lua_absindex(L, idx);
  switch (lua_type(L, idx)) {
    case LUA_TNIL:
      jb_add(L, b, "null", 4);
      return;
    case LUA_TBOOLEAN:
      if (lua_toboolean(L, idx)) jb_add(L, b, "true", 4);
      else jb_add(L, b, "false", 5);
      return;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        int n = snprintf(tmp, sizeof tmp, "%lld", (long long)lua_tointeger(L, idx));
        jb_add(L, b, tmp, (size_t)n);
      } else {
        double v = lua_tonumber(L, idx);
        if (!isfinite(v))
          luaL_error(L, "%s: cannot encode %f as JSON", what, v);
        jb_add(L, b, tmp, (size_t)fmt_double(tmp, sizeof tmp, v));
      }
      return;
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, idx, &n);
      jb_string(L, b, s, n);
      return;
    }
    case LUA_TTABLE:
      break;
    default:
      if (is_null(L, idx)) { jb_add(L, b, "null", 4); return; }
      if (luaL_testudata(L, idx, RBE_SECRET_MT)) {
        rbe_push_revealed(L, idx);
        jb_value(L, b, -1, depth, what);
        lua_pop(L, 1);
        return;
      }
      luaL_error(L, "%s: cannot encode a %s as JSON", what,
                 luaL_typename(L, idx));
      return;
  }
  if (depth > 100)
    luaL_error(L, "%s: table nested too deep for JSON (a cycle?)", what);
  luaL_checkstack(L, 6, "JSON nested too deep");
  int force = 0;   /* 1 array, 2 object */
  if (luaL_getmetafield(L, idx, "__jsontype") != LUA_TNIL) {
    const char *jt = lua_tostring(L, -1);
    force = jt && strcmp(jt, "array") == 0 ? 1 : jt && strcmp(jt, "object") == 0 ? 2 : 0;
    lua_pop(L, 1);
  }
  lua_Integer len = (lua_Integer)lua_rawlen(L, idx), count = 0;
  int arr = force != 2;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    count++;
    if (arr && (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1 ||
                lua_tointeger(L, -1) > len))
      arr = 0;
  }
  if (arr && (count != len || (count == 0 && force != 1))) arr = 0;
  if (arr) {
    jb_add(L, b, "[", 1);
    for (lua_Integer i = 1; i <= len; i++) {
      if (i > 1) jb_add(L, b, ",", 1);
      lua_rawgeti(L, idx, i);
      jb_value(L, b, -1, depth + 1, what);
      lua_pop(L, 1);
    }
    jb_add(L, b, "]", 1);
    return;
  }
  jb_add(L, b, "{", 1);
  int first = 1;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (!first) jb_add(L, b, ",", 1);
    first = 0;
    if (lua_type(L, -2) == LUA_TSTRING) {
      size_t n;
      const char *k = lua_tolstring(L, -2, &n);
      jb_string(L, b, k, n);
    } else if (lua_isinteger(L, -2)) {
      int n = snprintf(tmp, sizeof tmp, "\"%lld\"", (long long)lua_tointeger(L, -2));
      jb_add(L, b, tmp, (size_t)n);
    } else {
      luaL_error(L, "%s: JSON object keys must be strings, got %s", what,
                 luaL_typename(L, -2));
    }
    jb_add(L, b, ":", 1);
    jb_value(L, b, -1, depth + 1, what);
    lua_pop(L, 1);
  }
  jb_add(L, b, "}", 1);
}

/* Push the JSON text of the table at idx. */
static void push_json_text(lua_State *L, int idx, const char *what) {
  idx = lua_absindex(L, idx);
  jbuf *b = lua_newuserdatauv(L, sizeof *b, 0);
  memset(b, 0, sizeof *b);
  luaL_setmetatable(L, JBUF_MT);
  jb_value(L, b, idx, 0, what);
  lua_pushlstring(L, b->p ? b->p : "", b->n);
  lua_remove(L, -2);
}

typedef struct {
  const char *p;     /* NULL: SQL NULL */
  size_t len;
  int fmt;           /* 1: binary */
  Oid type;
} pval;

/* Turn the Lua value at idx into parameter $no's text; a string made on
 * the way is pushed (returns 1) and must stay reachable until copied. */
static int param_value(lua_State *L, int idx, pval *pv, const char *what,
                       int stmtno, int no) {
  char tmp[64];
  pv->p = NULL;
  pv->len = 0;
  pv->fmt = 0;
  pv->type = 0;
  switch (lua_type(L, idx)) {
    case LUA_TNIL:
      return 0;
    case LUA_TBOOLEAN:
      pv->p = lua_toboolean(L, idx) ? "t" : "f";
      pv->len = 1;
      return 0;
    case LUA_TNUMBER: {
      int n;
      if (lua_isinteger(L, idx))
        n = snprintf(tmp, sizeof tmp, "%lld", (long long)lua_tointeger(L, idx));
      else
        n = fmt_double(tmp, sizeof tmp, lua_tonumber(L, idx));
      lua_pushlstring(L, tmp, (size_t)n);
      pv->p = lua_tolstring(L, -1, &pv->len);
      return 1;
    }
    case LUA_TSTRING:
      pv->p = lua_tolstring(L, idx, &pv->len);
      /* text parameters are C strings in the client encoding: bytes that
       * are not go in binary form (right for bytea, a clear error else) */
      if (!utf8_valid((const unsigned char *)pv->p, pv->len)) pv->fmt = 1;
      return 0;
    case LUA_TTABLE:
      push_json_text(L, idx, what);
      pv->p = lua_tolstring(L, -1, &pv->len);
      return 1;
    default:
      break;
  }
  if (is_null(L, idx)) return 0;
  if (luaL_testudata(L, idx, BYTEA_MT)) {
    lua_getiuservalue(L, idx, 1);
    pv->p = lua_tolstring(L, -1, &pv->len);
    pv->fmt = 1;
    pv->type = 17;
    return 1;
  }
  if (luaL_testudata(L, idx, RBE_SECRET_MT)) {
    rbe_push_revealed(L, idx);
    int t = lua_type(L, -1);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
      luaL_error(L, "%s: parameter $%d: a secret must hold a string or a "
                 "number", what, no);
    if (t == LUA_TNUMBER) lua_tostring(L, -1);
    pv->p = lua_tolstring(L, -1, &pv->len);
    if (!utf8_valid((const unsigned char *)pv->p, pv->len)) pv->fmt = 1;
    return 1;
  }
  if (stmtno)
    return luaL_error(L, "%s: statement %d, parameter $%d: cannot send a %s "
                      "(use a string, number, boolean, nil/rbe.null, "
                      "pg.bytea(s) or a table for JSON)", what, stmtno, no,
                      luaL_typename(L, idx));
  return luaL_error(L, "%s: parameter $%d: cannot send a %s (use a string, "
                    "number, boolean, nil/rbe.null, pg.bytea(s) or a table "
                    "for JSON)", what, no, luaL_typename(L, idx));
}

/* One statement before it is copied into its request. */
typedef struct {
  const char *sql;
  size_t sqllen;
  int n;
  pval *pv;
} sspec;

static void check_count(lua_State *L, const char *what, int stmtno,
                        const char *sql, size_t sqllen, int n) {
  char where[32] = "";
  if (stmtno) snprintf(where, sizeof where, "statement %d: ", stmtno);
  if (strlen(sql) != sqllen)
    luaL_error(L, "%s: %sthe SQL contains a NUL byte", what, where);
  int want = count_params(sql, sqllen);
  if (want == n) return;
  if (want > MAX_PARAMS)
    luaL_error(L, "%s: %sat most %d parameters", what, where, MAX_PARAMS);
  if (want == 0)
    luaL_error(L, "%s: %sthe statement has no $1, $2, ... placeholders but "
               "%d value%s given", what, where, n, n == 1 ? " was" : "s were");
  char uses[32];
  if (want == 1) snprintf(uses, sizeof uses, "$1");
  else snprintf(uses, sizeof uses, "$1..$%d", want);
  luaL_error(L, "%s: %sthe statement uses %s but %d value%s given%s", what,
             where, uses, n, n == 1 ? " was" : "s were",
             n < want ? " (pass nil or rbe.null for NULL)" : "");
}

/* ---- building requests ---- */

static size_t align_up(size_t n, size_t a) { return (n + a - 1) & ~(a - 1); }

/* Allocate a request holding copies of the statements (and path). */
static pgop *op_new(int kind, const char *what, const sspec *specs, int nstmt,
                    const char *path) {
  size_t sz = sizeof(pgop);
  sz = align_up(sz, 16);
  size_t off_stmts = sz;
  sz += (size_t)nstmt * sizeof(stmt);
  for (int i = 0; i < nstmt; i++) {
    int n = specs[i].n;
    sz = align_up(sz, 8);
    sz += (size_t)n * (sizeof(char *) + 2 * sizeof(int) + sizeof(Oid));
    sz += specs[i].sqllen + 1;
    for (int j = 0; j < n; j++)
      if (specs[i].pv[j].p) sz += specs[i].pv[j].len + 1;
  }
  if (path) sz += strlen(path) + 1;
  pgop *op = calloc(1, sz);
  if (!op) return NULL;
  op->kind = kind;
  op->what = what;
  op->fd = -1;
  op->nstmt = nstmt;
  op->stmts = (stmt *)((char *)op + off_stmts);
  char *p = (char *)op + off_stmts + (size_t)nstmt * sizeof(stmt);
  for (int i = 0; i < nstmt; i++) {
    const sspec *sp = &specs[i];
    stmt *s = &op->stmts[i];
    int n = sp->n;
    p = (char *)op + align_up((size_t)(p - (char *)op), 8);
    const char **values = (const char **)p; p += (size_t)n * sizeof(char *);
    int *lengths = (int *)p; p += (size_t)n * sizeof(int);
    int *formats = (int *)p; p += (size_t)n * sizeof(int);
    Oid *types = (Oid *)p; p += (size_t)n * sizeof(Oid);
    int anybin = 0, anytype = 0;
    for (int j = 0; j < n; j++) {
      const pval *v = &sp->pv[j];
      lengths[j] = (int)v->len;
      formats[j] = v->fmt;
      types[j] = v->type;
      anybin |= v->fmt;
      anytype |= v->type != 0;
      if (!v->p) { values[j] = NULL; continue; }
      memcpy(p, v->p, v->len);
      p[v->len] = 0;
      values[j] = p;
      p += v->len + 1;
    }
    memcpy(p, sp->sql, sp->sqllen);
    p[sp->sqllen] = 0;
    s->sql = p;
    p += sp->sqllen + 1;
    s->nparams = n;
    s->values = n ? values : NULL;
    s->lengths = anybin ? lengths : NULL;
    s->formats = anybin ? formats : NULL;
    s->types = anytype ? types : NULL;
  }
  if (path) {
    strcpy(p, path);
    op->path = p;
  }
  if (kind == OP_PIPELINE || kind == OP_EXEC || nstmt) {
    int cap = kind == OP_PIPELINE ? nstmt : 1;
    if (kind == OP_EXEC) cap = 4;
    op->res = calloc((size_t)cap, sizeof(cres));
    if (!op->res) { free(op); return NULL; }
    op->capres = cap;
    if (kind == OP_PIPELINE) op->nres = nstmt;
  }
  S.ops++;
  return op;
}

/* ---- targets: a connection or a transaction on it ---- */

static pgconn *check_usable(lua_State *L, pgconn *c, const char *what) {
  if (!c || c->state == CS_CLOSED)
    luaL_error(L, "%s: the connection is closed", what);
  if (c->state == CS_BROKEN) {
    rbe_error_push(L, "pg", 1, "%s: the connection to %s was lost earlier "
                   "(%s); open a new one", what, c->desc,
                   c->broken ? c->broken : "connection lost");
    rbe_error_code_str(L, "08003");
    lua_error(L);
  }
  return c;
}

/* The connection behind argument 1 (conn or tx); *what names the method
 * for this kind of handle and *token is the transaction's token. */
static pgconn *get_target(lua_State *L, const char *const names[2],
                          const char **what, long *token, int usable) {
  conn_ud *u = luaL_testudata(L, 1, CONN_MT);
  if (u) {
    *what = names[0];
    *token = 0;
  } else {
    tx_ud *t = luaL_testudata(L, 1, TX_MT);
    if (!t)
      luaL_error(L, "%s: connection expected as the first argument (call "
                 "it with a colon: db%s), got %s", names[0],
                 strchr(names[0], ':'), luaL_typename(L, 1));
    *what = names[1];
    if (t->done)
      luaL_error(L, "%s: the transaction is over (use the tx handle only "
                 "inside its db:tx function)", names[1]);
    *token = t->token;
    lua_getiuservalue(L, 1, 1);
    u = lua_touserdata(L, -1);
    lua_pop(L, 1);
  }
  if (!usable) return u->c;
  return check_usable(L, u->c, *what);
}

/* sql argument at idx: a string, or {sql, timeout = d} */
static const char *sql_arg(lua_State *L, int idx, const char *what,
                           size_t *len, double *timeout, int *has_timeout) {
  static const char *const known[] = {"timeout", NULL};
  *has_timeout = 0;
  if (lua_type(L, idx) == LUA_TTABLE) {
    rbe_check_known_fields(L, idx, what, known);
    lua_getfield(L, idx, "timeout");
    if (!lua_isnil(L, -1)) {
      *timeout = rbe_check_duration(L, -1, what);
      *has_timeout = 1;
    }
    lua_pop(L, 1);
    lua_rawgeti(L, idx, 1);
    if (lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "%s: {sql, timeout = ...}: sql string expected at [1], "
                 "got %s", what, luaL_typename(L, -1));
    lua_replace(L, idx);
  }
  if (lua_type(L, idx) != LUA_TSTRING)
    luaL_error(L, "%s: SQL string expected, got %s", what,
               luaL_typename(L, idx));
  return lua_tolstring(L, idx, len);
}

static double opts_timeout(lua_State *L, int idx, const char *what,
                           double def, const char *const known[]) {
  if (lua_isnoneornil(L, idx)) return def;
  luaL_checktype(L, idx, LUA_TTABLE);
  rbe_check_known_fields(L, idx, what, known);
  return rbe_opt_duration_field(L, idx, "timeout", def);
}

/* Queue op and send it if the connection is free.  Nothing here raises;
 * a failure to send is reported from the timer, after the yield. */
static void submit(pgconn *c, pgop *op, rbe_wait *w, double timeout,
                   long token) {
  op->c = c;
  op->w = w;
  op->token = token;
  op->task = rbe_task_current();
  if (timeout > 0) {
    op->timeout = timeout;
    op->deadline = uv_now(rbe_loop()) + rbe_duration_ms(timeout);
    c->ntimed++;
  }
  int blocked = c->lock_token && token != c->lock_token &&
                op->task != c->lock_task;
  if (blocked) {
    q_append(&c->bhead, &c->btail, op);
  } else {
    q_append(&c->head, &c->tail, op);
    if (c->head == op && !c->ncancel) {
      if (op_send(op) == 0) op->state = OPS_SENT;
      else { op->state = OPS_SEND_FAILED; c->kicked = 1; }
    }
  }
  if (op->deadline || c->kicked) timer_arm(c);
  poll_update(c);
}

static int op_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  rbe_wait_values(L, ctx);
  box *b = luaL_checkudata(L, -1, BOX_MT);
  pgop *op = b->op;
  switch (op->kind) {
    case OP_QUERY:
      push_rows(L, op, op->nres ? &op->res[0] : NULL, NULL);
      break;
    case OP_EXEC:
      lua_createtable(L, op->nres, 0);
      for (int i = 0; i < op->nres; i++) {
        lua_createtable(L, 0, 2);
        lua_pushstring(L, CS(op, op->res[i].cmd));
        lua_setfield(L, -2, "command");
        lua_pushinteger(L, op->res[i].affected);
        lua_setfield(L, -2, "affected");
        lua_rawseti(L, -2, i + 1);
      }
      break;
    case OP_PIPELINE: {
      lua_createtable(L, op->nstmt, 0);
      int list = lua_gettop(L);
      rcache k = {NULL, list + 1};
      for (int i = 0; i < op->nstmt; i++) {
        push_rows(L, op, &op->res[i], &k);
        lua_rawseti(L, list, i + 1);
      }
      lua_settop(L, list);
      break;
    }
    default:
      lua_createtable(L, 0, 3);
      lua_pushinteger(L, op->nres ? op->res[0].affected : 0);
      lua_setfield(L, -2, "rows");
      lua_pushinteger(L, op->bytes);
      lua_setfield(L, -2, "bytes");
      lua_pushstring(L, op->path);
      lua_setfield(L, -2, "path");
      break;
  }
  b->op = NULL;
  op_free(op);
  return 1;
}

/* conn:query(sql, ...) -> rows  [yields]
 * sql may be {sql, timeout = d}; ... are the values of $1..$n. */
static int conn_query(lua_State *L) {
  const char *what;
  long token;
  pgconn *c = get_target(L, N_QUERY, &what, &token, 1);
  double timeout = c->timeout;
  int has_t;
  sspec sp;
  sp.sql = sql_arg(L, 2, what, &sp.sqllen, &timeout, &has_t);
  int top = lua_gettop(L);
  sp.n = top - 2;
  check_count(L, what, 0, sp.sql, sp.sqllen, sp.n);
  pval local[16];
  sp.pv = sp.n <= 16 ? local
        : lua_newuserdatauv(L, (size_t)sp.n * sizeof(pval), 0);
  luaL_checkstack(L, sp.n + 8, "too many parameters");
  for (int i = 0; i < sp.n; i++)
    param_value(L, 3 + i, &sp.pv[i], what, 0, i + 1);
  rbe_wait *w = rbe_wait_new(L, what);
  pgop *op = op_new(OP_QUERY, what, &sp, 1, NULL);
  if (!op) return luaL_error(L, "%s: out of memory", what);
  /* past this point nothing raises */
  submit(c, op, w, timeout, token);
  return rbe_wait_yieldk(L, w, op_cancel, op, op_k);
}

/* conn:exec(script[, opts]) -> {{command, affected}, ...}  [yields]
 * Simple query protocol: several statements, no parameters. */
static int conn_exec(lua_State *L) {
  static const char *const known[] = {"timeout", NULL};
  const char *what;
  long token;
  pgconn *c = get_target(L, N_EXEC, &what, &token, 1);
  double timeout = c->timeout;
  int has_t;
  sspec sp;
  sp.sql = sql_arg(L, 2, what, &sp.sqllen, &timeout, &has_t);
  if (!lua_isnoneornil(L, 3) && !lua_istable(L, 3))
    return luaL_error(L, "%s takes no parameters (a script runs with the "
                      "simple query protocol); use db:query(sql, ...) for "
                      "$1, $2, ...", what);
  if (lua_gettop(L) > 3)
    return luaL_error(L, "%s takes no parameters; use db:query(sql, ...)",
                      what);
  if (!has_t) timeout = opts_timeout(L, 3, what, timeout, known);
  if (strlen(sp.sql) != sp.sqllen)
    return luaL_error(L, "%s: the script contains a NUL byte", what);
  sp.n = 0;
  sp.pv = NULL;
  rbe_wait *w = rbe_wait_new(L, what);
  pgop *op = op_new(OP_EXEC, what, &sp, 1, NULL);
  if (!op) return luaL_error(L, "%s: out of memory", what);
  submit(c, op, w, timeout, token);
  return rbe_wait_yieldk(L, w, op_cancel, op, op_k);
}

/* conn:_pipeline(list[, opts]) -> {rows, ...}  [yields]
 * list[i] = "sql" or {n = k, sql, p1, ..., p(k-1)} */
static int conn_pipeline(lua_State *L) {
  static const char *const known[] = {"timeout", NULL};
  const char *what;
  long token;
  pgconn *c = get_target(L, N_PIPE, &what, &token, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  double timeout = opts_timeout(L, 3, what, c->timeout, known);
  lua_settop(L, 3);
  int n = (int)lua_rawlen(L, 2);
  if (n == 0) { lua_newtable(L); return 1; }
  lua_newtable(L);                                      /* 4: holder */
  int hn = 0;
  sspec *specs = lua_newuserdatauv(L, (size_t)n * sizeof(sspec), 0);  /* 5 */
  int total = 0;
  for (int i = 1; i <= n; i++) {
    if (lua_rawgeti(L, 2, i) == LUA_TSTRING) { lua_pop(L, 1); continue; }
    if (!lua_istable(L, -1))
      return luaL_error(L, "%s: statement %d: SQL or table expected", what, i);
    lua_getfield(L, -1, "n");
    int k = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1)
                                 : (int)lua_rawlen(L, -2);
    lua_pop(L, 2);
    if (k < 1) return luaL_error(L, "%s: statement %d: SQL missing", what, i);
    total += k - 1;
  }
  pval *pvs = lua_newuserdatauv(L, (size_t)(total ? total : 1) * sizeof(pval), 0);
  int used = 0;
  for (int i = 1; i <= n; i++) {
    sspec *sp = &specs[i - 1];
    if (lua_rawgeti(L, 2, i) == LUA_TSTRING) {
      /* plain SQL, no parameters (anchored by the list) */
      sp->sql = lua_tolstring(L, -1, &sp->sqllen);
      sp->n = 0;
      sp->pv = NULL;
      check_count(L, what, i, sp->sql, sp->sqllen, 0);
      lua_pop(L, 1);
      continue;
    }
    int ti = lua_gettop(L);
    lua_getfield(L, ti, "n");
    int k = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1)
                                 : (int)lua_rawlen(L, ti);
    lua_pop(L, 1);
    lua_rawgeti(L, ti, 1);
    if (lua_type(L, -1) != LUA_TSTRING)
      return luaL_error(L, "%s: statement %d: SQL string expected, got %s",
                        what, i, luaL_typename(L, -1));
    sp->sql = lua_tolstring(L, -1, &sp->sqllen);
    lua_rawseti(L, 4, ++hn);
    sp->n = k - 1;
    sp->pv = pvs + used;
    check_count(L, what, i, sp->sql, sp->sqllen, sp->n);
    for (int j = 0; j < sp->n; j++) {
      lua_rawgeti(L, ti, j + 2);
      int pushed = param_value(L, -1, &sp->pv[j], what, i, j + 1);
      if (pushed) lua_rawseti(L, 4, ++hn);
      /* the original value stays reachable from the list */
      lua_pop(L, 1);
    }
    used += sp->n;
    lua_settop(L, ti - 1);
  }
  rbe_wait *w = rbe_wait_new(L, what);
  pgop *op = op_new(OP_PIPELINE, what, specs, n, NULL);
  if (!op) return luaL_error(L, "%s: out of memory", what);
  submit(c, op, w, timeout, token);
  return rbe_wait_yieldk(L, w, op_cancel, op, op_k);
}

static void raise_fs(lua_State *L, const char *what, const char *doing,
                     const char *path, int err) {
  rbe_error_push(L, "fs", 0, "%s: %s %s: %s", what, doing, path,
                 strerror(err));
  const char *nm = strerrorname_np(err);
  rbe_error_code_str(L, nm ? nm : "EIO");
  lua_error(L);
}

static int copy_common(lua_State *L, int out) {
  static const char *const known[] = {"timeout", NULL};
  const char *what;
  long token;
  pgconn *c = get_target(L, out ? N_COPY_OUT : N_COPY_IN, &what, &token, 1);
  double timeout = c->timeout;
  int has_t;
  sspec sp;
  sp.sql = sql_arg(L, 2, what, &sp.sqllen, &timeout, &has_t);
  const char *path = luaL_checkstring(L, 3);
  if (!has_t) timeout = opts_timeout(L, 4, what, timeout, known);
  if (strlen(sp.sql) != sp.sqllen)
    return luaL_error(L, "%s: the statement contains a NUL byte", what);
  sp.n = 0;
  sp.pv = NULL;
  rbe_wait *w = rbe_wait_new(L, what);
  char *tmp = NULL;
  int fd;
  if (out) {
    size_t n = strlen(path) + 64;
    tmp = malloc(n);
    if (!tmp) return luaL_error(L, "%s: out of memory", what);
    snprintf(tmp, n, "%s.rbe-tmp.%ld.%ld", path, (long)getpid(),
             ++tmp_counter);
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) {
      int e = errno;
      free(tmp);
      raise_fs(L, what, "cannot create", path, e);
    }
  } else {
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) raise_fs(L, what, "cannot open", path, errno);
  }
  pgop *op = op_new(out ? OP_COPY_OUT : OP_COPY_IN, what, &sp, 1, path);
  char *buf = malloc(COPY_CHUNK);
  if (!op || !buf) {
    close(fd);
    if (tmp) { unlink(tmp); free(tmp); }
    free(buf);
    if (op) op_free(op);
    return luaL_error(L, "%s: out of memory", what);
  }
  /* past this point nothing raises */
  op->fd = fd;
  op->tmp = tmp;
  op->buf = buf;
  submit(c, op, w, timeout, token);
  return rbe_wait_yieldk(L, w, op_cancel, op, op_k);
}

/* conn:copy_out(sql, path[, opts]) -> {rows, bytes, path}  [yields]
 * COPY ... TO STDOUT into path (written to a temporary file, synced and
 * renamed into place when the COPY succeeded). */
static int conn_copy_out(lua_State *L) { return copy_common(L, 1); }

/* conn:copy_in(sql, path[, opts]) -> {rows, bytes, path}  [yields]
 * COPY ... FROM STDIN with the contents of path. */
static int conn_copy_in(lua_State *L) { return copy_common(L, 0); }

/* ---- notifications ---- */

static int push_notif_fn(lua_State *L, void *ud) {
  notif *nt = ud;
  if (!L) { free(nt); return 0; }
  lua_createtable(L, 0, 3);
  lua_pushstring(L, nt->channel);
  lua_setfield(L, -2, "channel");
  lua_pushstring(L, nt->payload);
  lua_setfield(L, -2, "payload");
  lua_pushinteger(L, nt->pid);
  lua_setfield(L, -2, "pid");
  free(nt);
  return 1;
}

static void lwait_cancel(void *ud) {
  lwait *lw = ud;
  pgconn *c = lw->c;
  if (lw->prev) lw->prev->next = lw->next;
  else c->lwaits = lw->next;
  if (lw->next) lw->next->prev = lw->prev;
  if (lw->deadline) c->ntimed--;
  free(lw);
  update_ref(c);
}

/* conn:_next_notification([channel[, timeout]]) -> {channel, payload,
 * pid}  [yields until one arrives] */
static int conn_next_notification(lua_State *L) {
  const char *what;
  long token;
  pgconn *c = get_target(L, N_LISTEN, &what, &token, 1);
  const char *ch = luaL_optstring(L, 2, "");
  double timeout = lua_isnoneornil(L, 3) ? 0
                 : rbe_check_duration(L, 3, "db:listen: timeout");
  notif *prev = NULL;
  for (notif *n = c->nhead; n; prev = n, n = n->next) {
    if (*ch && strcmp(ch, n->channel) != 0) continue;
    if (prev) prev->next = n->next;
    else c->nhead = n->next;
    if (c->ntail == n) c->ntail = prev;
    c->nnotif--;
    return push_notif_fn(L, n);
  }
  rbe_wait *w = rbe_wait_new(L, what);
  size_t cl = strlen(ch);
  lwait *lw = calloc(1, sizeof *lw + cl + 1);
  if (!lw) return luaL_error(L, "%s: out of memory", what);
  /* past this point nothing raises */
  memcpy(lw->channel, ch, cl + 1);
  lw->c = c;
  lw->w = w;
  lw->timeout = timeout;
  lwait **pp = &c->lwaits;
  while (*pp) { lw->prev = *pp; pp = &(*pp)->next; }
  *pp = lw;
  if (timeout > 0) {
    lw->deadline = uv_now(rbe_loop()) + rbe_duration_ms(timeout);
    c->ntimed++;
    timer_arm(c);
  }
  update_ref(c);
  return rbe_wait_yield(L, w, lwait_cancel, lw);
}

/* ---- transactions: the connection's lock ---- */

static void push_tx(lua_State *L, int connidx, long token) {
  tx_ud *t = lua_newuserdatauv(L, sizeof *t, 1);
  t->token = token;
  t->done = 0;
  lua_pushvalue(L, connidx);
  lua_setiuservalue(L, -2, 1);
  luaL_setmetatable(L, TX_MT);
}

static int push_lock(lua_State *L, void *ud) {
  pgop *op = ud;
  long token = op->granted;
  pgconn *c = op->c;
  op_free(op);
  if (!L) {
    /* granted, but the task is gone: pass the lock on */
    if (c && c->lock_token == token) release_lock(c);
    return 0;
  }
  lua_pushinteger(L, token);
  return 1;
}

static void release_lock(pgconn *c) {
  c->lock_token = 0;
  c->lock_task = NULL;
  while (c->bhead) {
    pgop *op = c->bhead;
    c->bhead = op->next;
    if (!c->bhead) c->btail = NULL;
    op->next = NULL;
    if (op->kind == OP_LOCK) {
      c->lock_token = op->granted = ++c->next_token;
      c->lock_task = op->task;
      rbe_wait *w = op->w;
      op->w = NULL;
      rbe_wait_done(w, push_lock, op);
      break;
    }
    q_append(&c->head, &c->tail, op);
  }
  if (c->state == CS_READY) {
    pump(c);
    if (c->state == CS_READY) poll_update(c);
  }
}

static int lock_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  rbe_wait_values(L, ctx);
  long token = (long)lua_tointeger(L, -1);
  push_tx(L, 1, token);
  return 1;
}

/* conn:_lock() -> tx  [yields while another transaction holds the
 * connection] */
static int conn_lock(lua_State *L) {
  conn_ud *u = luaL_checkudata(L, 1, CONN_MT);
  pgconn *c = check_usable(L, u->c, "db:tx");
  lua_settop(L, 1);
  rbe_task *t = rbe_task_current();
  if (!t) return luaL_error(L, "db:tx must run inside a task");
  if (c->lock_token && c->lock_task == t)
    return luaL_error(L, "db:tx: this task already has a transaction open "
                      "on this connection; use tx:tx(fn) inside it for a "
                      "nested one (a savepoint)");
  if (!c->lock_token) {
    c->lock_token = ++c->next_token;
    c->lock_task = t;
    push_tx(L, 1, c->lock_token);
    return 1;
  }
  rbe_wait *w = rbe_wait_new(L, "db:tx");
  pgop *op = op_new(OP_LOCK, "db:tx", NULL, 0, NULL);
  if (!op) return luaL_error(L, "db:tx: out of memory");
  op->c = c;
  op->w = w;
  op->task = t;
  q_append(&c->bhead, &c->btail, op);
  update_ref(c);
  return rbe_wait_yieldk(L, w, op_cancel, op, lock_k);
}

/* tx:_unlock() -> nothing: the transaction is over (idempotent) */
static int tx_unlock(lua_State *L) {
  tx_ud *t = luaL_checkudata(L, 1, TX_MT);
  if (t->done) return 0;
  t->done = 1;
  lua_getiuservalue(L, 1, 1);
  conn_ud *u = lua_touserdata(L, -1);
  pgconn *c = u ? u->c : NULL;
  if (c && c->lock_token == t->token) release_lock(c);
  return 0;
}

/* A transaction handle collected while still open (its task vanished
 * without unwinding): roll back without waiting, then unlock. */
static int tx_gc(lua_State *L) {
  tx_ud *t = luaL_checkudata(L, 1, TX_MT);
  if (t->done) return 0;
  t->done = 1;
  lua_getiuservalue(L, 1, 1);
  conn_ud *u = lua_touserdata(L, -1);
  pgconn *c = u ? u->c : NULL;
  if (!c || c->lock_token != t->token) return 0;
  if (c->state == CS_READY) {
    sspec sp = {"ROLLBACK", 8, 0, NULL};
    pgop *op = op_new(OP_EXEC, "db:tx", &sp, 1, NULL);
    if (op) submit(c, op, NULL, 0, t->token);
  }
  release_lock(c);
  return 0;
}

static int tx_tostring(lua_State *L) {
  tx_ud *t = luaL_checkudata(L, 1, TX_MT);
  lua_getiuservalue(L, 1, 1);
  conn_ud *u = lua_touserdata(L, -1);
  lua_pushfstring(L, "pg.tx on %s (%s)", u && u->c ? u->c->desc : "?",
                  t->done ? "over" : "open");
  return 1;
}

/* tx:_conn() -> the connection the transaction runs on */
static int tx_conn(lua_State *L) {
  luaL_checkudata(L, 1, TX_MT);
  lua_getiuservalue(L, 1, 1);
  return 1;
}

/* ---- the connection handle ---- */

/* conn:close() -> nothing.  A request in flight is cancelled on the
 * server; waiting tasks get a `pg` error.  Closing twice is fine. */
static int conn_close_l(lua_State *L) {
  conn_ud *u = luaL_checkudata(L, 1, CONN_MT);
  if (u->c) conn_close(u->c);
  return 0;
}

static int conn_gc(lua_State *L) {
  conn_ud *u = luaL_checkudata(L, 1, CONN_MT);
  pgconn *c = u->c;
  if (!c) return 0;
  u->c = NULL;
  conn_close(c);
  c->owned = 0;
  maybe_free(c);
  return 0;
}

static int conn_tostring(lua_State *L) {
  conn_ud *u = luaL_checkudata(L, 1, CONN_MT);
  if (!u->c) lua_pushliteral(L, "pg.conn (closed)");
  else lua_pushfstring(L, "pg.conn %s (%s)", u->c->desc,
                       state_names[u->c->state]);
  return 1;
}

/* conn:status() -> "ready" | "broken" | "closed" */
static int conn_status(lua_State *L) {
  const char *what;
  long token;
  pgconn *c = get_target(L, N_INFO, &what, &token, 0);
  lua_pushstring(L, c ? state_names[c->state] : "closed");
  return 1;
}

static const char *tx_status_name(PGconn *pq) {
  switch (PQtransactionStatus(pq)) {
    case PQTRANS_IDLE: return "idle";
    case PQTRANS_ACTIVE: return "active";
    case PQTRANS_INTRANS: return "in_transaction";
    case PQTRANS_INERROR: return "failed_transaction";
    default: return "unknown";
  }
}

/* conn:info() -> {desc, status, host, port, dbname, user, backend_pid,
 * server_version, application_name, tx_status, ssl, notifications_dropped} */
static int conn_info(lua_State *L) {
  const char *what;
  long token;
  pgconn *c = get_target(L, N_INFO, &what, &token, 0);
  lua_createtable(L, 0, 12);
  lua_pushstring(L, c ? c->desc : "");
  lua_setfield(L, -2, "desc");
  lua_pushstring(L, c ? state_names[c->state] : "closed");
  lua_setfield(L, -2, "status");
  if (!c || c->state != CS_READY) {
    if (c && c->broken) {
      lua_pushstring(L, c->broken);
      lua_setfield(L, -2, "error");
    }
    return 1;
  }
  PGconn *pq = c->pq;
  set_field_str(L, "host", PQhost(pq));
  set_field_str(L, "port", PQport(pq));
  set_field_str(L, "dbname", PQdb(pq));
  set_field_str(L, "user", PQuser(pq));
  set_field_str(L, "application_name",
                PQparameterStatus(pq, "application_name"));
  set_field_str(L, "server_version_string",
                PQparameterStatus(pq, "server_version"));
  lua_pushinteger(L, PQbackendPID(pq));
  lua_setfield(L, -2, "backend_pid");
  lua_pushinteger(L, PQserverVersion(pq));
  lua_setfield(L, -2, "server_version");
  lua_pushstring(L, tx_status_name(pq));
  lua_setfield(L, -2, "tx_status");
  lua_pushboolean(L, PQsslInUse(pq));
  lua_setfield(L, -2, "ssl");
  lua_pushinteger(L, c->ndropped);
  lua_setfield(L, -2, "notifications_dropped");
  int queued = 0;
  for (pgop *op = c->head; op; op = op->next) queued++;
  for (pgop *op = c->bhead; op; op = op->next) queued++;
  lua_pushinteger(L, queued);
  lua_setfield(L, -2, "queued");
  return 1;
}

/* conn:_tx_status() -> "idle" | "in_transaction" | ... | "none" */
static int conn_tx_status(lua_State *L) {
  const char *what;
  long token;
  pgconn *c = get_target(L, N_INFO, &what, &token, 0);
  if (!c || c->state != CS_READY) lua_pushliteral(L, "none");
  else if (c->head || c->bhead || c->lock_token) lua_pushliteral(L, "busy");
  else lua_pushstring(L, tx_status_name(c->pq));
  return 1;
}

/* conn:notices() -> array of the server's NOTICE/WARNING messages since
 * the last call (at most the last 100) */
static int conn_notices(lua_State *L) {
  const char *what;
  long token;
  pgconn *c = get_target(L, N_INFO, &what, &token, 0);
  int n = c ? c->nnotices : 0;
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_pushstring(L, c->notices[i]);
    lua_rawseti(L, -2, i + 1);
    free(c->notices[i]);
  }
  if (c) c->nnotices = 0;
  return 1;
}

/* conn:escape_literal(s) -> 'quoted' for the connection's encoding */
static int conn_escape_literal(lua_State *L) {
  const char *what;
  long token;
  pgconn *c = get_target(L, N_ESCAPE, &what, &token, 1);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  char *q = PQescapeLiteral(c->pq, s, n);
  if (!q) return luaL_error(L, "%s: %s", what, PQerrorMessage(c->pq));
  lua_pushstring(L, q);
  PQfreemem(q);
  return 1;
}

/* ---- semaphores (pools) ---- */

static void sem_give(sem *s);

static int sem_push(lua_State *L, void *ud) {
  semwait *n = ud;
  sem *s = n->s;
  free(n);
  if (!L) sem_give(s);        /* granted, but the task is gone */
  return 0;
}

static void sem_give(sem *s) {
  semwait *n = s->head;
  if (!n) { s->permits++; return; }
  s->head = n->next;
  if (s->head) s->head->prev = NULL;
  else s->tail = NULL;
  rbe_wait_done(n->w, sem_push, n);
}

static void sem_cancel(void *ud) {
  semwait *n = ud;
  sem *s = n->s;
  if (n->prev) n->prev->next = n->next;
  else s->head = n->next;
  if (n->next) n->next->prev = n->prev;
  else s->tail = n->prev;
  free(n);
}

/* pg.core.semaphore(n) -> semaphore with n permits */
static int l_semaphore(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  if (n < 0) return luaL_error(L, "semaphore: permits must be >= 0");
  sem *s = lua_newuserdatauv(L, sizeof *s, 0);
  s->permits = n;
  s->head = s->tail = NULL;
  luaL_setmetatable(L, SEM_MT);
  return 1;
}

/* sem:acquire() -> nothing  [yields until a permit is free, FIFO] */
static int sem_acquire(lua_State *L) {
  sem *s = luaL_checkudata(L, 1, SEM_MT);
  if (s->permits > 0 && !s->head) {
    s->permits--;
    return 0;
  }
  rbe_wait *w = rbe_wait_new(L, "pool:acquire");
  semwait *n = malloc(sizeof *n);
  if (!n) return luaL_error(L, "pool:acquire: out of memory");
  n->s = s;
  n->w = w;
  n->next = NULL;
  n->prev = s->tail;
  if (s->tail) s->tail->next = n;
  else s->head = n;
  s->tail = n;
  return rbe_wait_yield(L, w, sem_cancel, n);
}

/* sem:release() -> nothing: a waiting task gets the permit */
static int sem_release(lua_State *L) {
  sem_give(luaL_checkudata(L, 1, SEM_MT));
  return 0;
}

/* sem:state() -> permits, waiting */
static int sem_state(lua_State *L) {
  sem *s = luaL_checkudata(L, 1, SEM_MT);
  int waiting = 0;
  for (semwait *n = s->head; n; n = n->next) waiting++;
  lua_pushinteger(L, s->permits);
  lua_pushinteger(L, waiting);
  return 2;
}

/* ---- module ---- */

/* pg.bytea(s) -> a value sent as bytea in binary form (any bytes) */
static int l_bytea(lua_State *L) {
  luaL_checkstring(L, 1);
  lua_newuserdatauv(L, 0, 1);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);
  luaL_setmetatable(L, BYTEA_MT);
  return 1;
}

static int bytea_tostring(lua_State *L) {
  luaL_checkudata(L, 1, BYTEA_MT);
  lua_getiuservalue(L, 1, 1);
  lua_pushfstring(L, "pg.bytea(%d bytes)", (int)lua_rawlen(L, -1));
  return 1;
}

/* pg.core._stats() -> {conns, ops}: C structs alive (leak checks) */
static int l_stats(lua_State *L) {
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, S.conns);
  lua_setfield(L, -2, "conns");
  lua_pushinteger(L, S.ops);
  lua_setfield(L, -2, "ops");
  return 1;
}

/* pg.core._count_params(sql) -> n (tests) */
static int l_count_params(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  lua_pushinteger(L, count_params(s, n));
  return 1;
}

/* pg.core._decode(type_oid, text) -> value (tests) */
static int l_decode(lua_State *L) {
  lua_Integer t = luaL_checkinteger(L, 1);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  push_value(L, (Oid)t, s, n);
  return 1;
}

/* pg.core._encode_json(v) -> text (tests) */
static int l_encode_json(lua_State *L) {
  luaL_checkany(L, 1);
  if (lua_istable(L, 1)) push_json_text(L, 1, "json");
  else {
    jbuf *b = lua_newuserdatauv(L, sizeof *b, 0);
    memset(b, 0, sizeof *b);
    luaL_setmetatable(L, JBUF_MT);
    jb_value(L, b, 1, 0, "json");
    lua_pushlstring(L, b->p ? b->p : "", b->n);
  }
  return 1;
}

static const luaL_Reg conn_methods[] = {
  {"query", conn_query},
  {"exec", conn_exec},
  {"copy_out", conn_copy_out},
  {"copy_in", conn_copy_in},
  {"close", conn_close_l},
  {"status", conn_status},
  {"info", conn_info},
  {"notices", conn_notices},
  {"escape_literal", conn_escape_literal},
  {"_pipeline", conn_pipeline},
  {"_next_notification", conn_next_notification},
  {"_lock", conn_lock},
  {"_tx_status", conn_tx_status},
  {NULL, NULL}
};

static const luaL_Reg tx_methods[] = {
  {"query", conn_query},
  {"exec", conn_exec},
  {"copy_out", conn_copy_out},
  {"copy_in", conn_copy_in},
  {"status", conn_status},
  {"info", conn_info},
  {"notices", conn_notices},
  {"escape_literal", conn_escape_literal},
  {"_pipeline", conn_pipeline},
  {"_next_notification", conn_next_notification},
  {"_unlock", tx_unlock},
  {"_conn", tx_conn},
  {NULL, NULL}
};

static const luaL_Reg sem_methods[] = {
  {"acquire", sem_acquire},
  {"release", sem_release},
  {"state", sem_state},
  {NULL, NULL}
};

static const luaL_Reg pg_funcs[] = {
  {"connect", l_connect},
  {"semaphore", l_semaphore},
  {"bytea", l_bytea},
  {"_stats", l_stats},
  {"_count_params", l_count_params},
  {"_decode", l_decode},
  {"_encode_json", l_encode_json},
  {NULL, NULL}
};

/* Lua unloads C modules (dlclose) at lua_close, before main.c runs the
 * loop one last time for close callbacks and cancel requests that live in
 * this file: keep the module mapped for the life of the process. */
static void pin_module(void) {
  Dl_info info;
  if (dladdr((void *)luaopen_rbe_pg, &info) && info.dli_fname)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE);
}

static void new_mt(lua_State *L, const char *name, const luaL_Reg *methods,
                   lua_CFunction gc, lua_CFunction tostring) {
  luaL_newmetatable(L, name);
  if (methods) {
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
  }
  if (gc) {
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
  }
  if (tostring) {
    lua_pushcfunction(L, tostring);
    lua_setfield(L, -2, "__tostring");
  }
}

int luaopen_rbe_pg(lua_State *L) {
  pin_module();
  new_mt(L, CONN_MT, conn_methods, conn_gc, conn_tostring);
  lua_pushcfunction(L, conn_close_l);
  lua_setfield(L, -2, "__close");
  lua_getfield(L, -1, "__index");         /* stack: mt, methods */
  lua_remove(L, -2);
  new_mt(L, TX_MT, tx_methods, tx_gc, tx_tostring);
  lua_getfield(L, -1, "__index");         /* stack: conn m, tx mt, tx m */
  lua_remove(L, -2);
  new_mt(L, SEM_MT, sem_methods, NULL, NULL);
  lua_pop(L, 1);
  new_mt(L, BOX_MT, NULL, box_gc, NULL);
  lua_pop(L, 1);
  new_mt(L, JBUF_MT, NULL, jbuf_gc, NULL);
  lua_pop(L, 1);
  new_mt(L, BYTEA_MT, NULL, NULL, bytea_tostring);
  lua_pop(L, 1);

  /* the keywords libpq accepts, for a clear error on a typo */
  lua_newtable(L);
  PQconninfoOption *defs = PQconndefaults();
  for (PQconninfoOption *o = defs; o && o->keyword; o++) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, o->keyword);
  }
  if (defs) PQconninfoFree(defs);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &kw_key);

  luaL_newlib(L, pg_funcs);               /* stack: conn m, tx m, lib */
  lua_insert(L, -3);
  lua_setfield(L, -3, "tx_methods");
  lua_setfield(L, -2, "conn_methods");
  lua_createtable(L, 0, 1);
  int v = PQlibVersion();
  lua_pushfstring(L, "%d.%d", v / 10000, v % 10000);
  lua_setfield(L, -2, "libpq");
  lua_setfield(L, -2, "_versions");
  return 1;
}
