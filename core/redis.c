/* redis.c: asynchronous Redis on hiredis's async API (module
 * "rbe.redis.core", wrapped by lua/rbe/redis.lua).
 *
 * Ownership: a `conn` is malloc'd and owned by C.  It holds one
 * redisAsyncContext and three uv handles of our own event adapter (a
 * uv_poll_t on the socket, a uv_timer_t for connect/command deadlines and
 * a uv_prepare_t that writes what the tasks queued once per loop turn, so
 * a thousand tasks' commands leave in one write).  It is freed only when
 * (1) hiredis has freed the context (the adapter's cleanup hook ran), (2)
 * every handle got its close callback, (3) no request or parked wait
 * points at it (`refs`) and (4) no "rbe.redis.conn" userdata points at it.
 *
 * Requests (`req`) belong to hiredis from the moment a command is queued
 * until its callback: hiredis calls every callback exactly once, with a
 * NULL reply when the connection goes away.  A cancelled task only detaches
 * its wait (req->w = NULL); the reply still arrives and is dropped.
 * Commands are formatted here straight into the protocol (pipelines as they
 * are recorded, by "rbe.redis.pipeline" userdata) and handed to hiredis
 * whole.  Replies are built by our reader functions, one allocation each,
 * and a callback may keep ("steal") its reply past the free hiredis does
 * after it; the task converts it to Lua values when it resumes.  Nothing
 * here calls into Lua from a hiredis callback, and a close requested while
 * hiredis is on the stack is deferred until it returns.
 *
 * A command that gets no reply within its timeout closes the connection:
 * the server may still answer it later, and every request queued behind it
 * would wait as long.  Pub/sub connections use hiredis's subscribe
 * machinery with a single callback whose privdata is the conn itself.
 * The library stays loaded until exit (RTLD_NODELETE): close callbacks of
 * handles closed by finalizers at lua_close run after Lua unloads it. */
#include "aux.h"
#include "task.h"

#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/sds.h>

#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define CONN_MT "rbe.redis.conn"
#define MSG_QUEUE_MAX 10000

typedef struct conn conn;
typedef struct req req;
typedef struct msg msg;

enum { RQ_CALL, RQ_PIPE, RQ_HANDSHAKE };

struct req {
  conn *c;
  rbe_wait *w;             /* NULL once detached (the task went away) */
  req *prev, *next;        /* c's in-flight list, in send order */
  uint64_t deadline;       /* loop ms; 0 = none */
  double timeout;          /* seconds, for messages */
  int kind;
  int n, got;              /* replies expected, received */
  int lost;                /* a NULL reply came: the connection is gone */
  int blocking;            /* BLPOP & co: occupies the connection */
  redisReply *one;         /* RQ_CALL */
  redisReply **replies;    /* RQ_PIPE, RQ_HANDSHAKE */
  char cmd[32];            /* command name, for messages */
  char names[4][16];       /* RQ_HANDSHAKE: each command's name */
};

struct msg {
  msg *next;
  redisReply *r;
};

struct conn {
  redisAsyncContext *ac;   /* NULL once hiredis freed it */
  uv_poll_t poll;
  uv_timer_t timer;
  uv_prepare_t prepare;
  int handles;             /* handles whose close callback is pending */
  int handles_open;
  int mask;                /* events the poll handle watches now */
  int want_read, want_write;   /* what hiredis asked for */
  int blocked;             /* a flush could not write everything */
  int paused;              /* pub/sub queue full: stop reading */
  int connected;
  int tcp;                 /* not a unix socket */
  int in_hiredis;          /* depth of our calls into hiredis */
  int close_pending;
  int owned;               /* an "rbe.redis.conn" userdata points here */
  int refs;                /* reqs and parked waits that point here */
  int ready;               /* handshake done (or none) */
  int hs_failed;
  int dying;               /* hiredis is failing its callbacks: going away */
  int sub;                 /* in subscribe mode */
  uint64_t timer_due;
  uint64_t connect_deadline;
  double connect_timeout;
  double timeout;          /* default per command, seconds; 0 none */
  req *head, *tail;        /* requests in flight */
  long inflight;
  /* why it closed: the first cause wins */
  int err_set;
  int err_retryable;
  char err_kind[16];
  char err_code[32];
  char err_msg[512];
  /* pub/sub */
  msg *q_head, *q_tail;
  long q_len;
  rbe_wait *sub_w;
  uint64_t sub_deadline;
  char desc[256];          /* the target, password as *** */
};

typedef struct {
  conn *c;
} conn_ud;

static struct {
  long conns;              /* conn structs not yet freed */
  long reqs;               /* req structs not yet freed */
  redisReply *stolen;      /* the reply a callback keeps */
} S;

static void conn_maybe_free(conn *c);
static void conn_close(conn *c, const char *kind, const char *code,
                       int retryable, const char *fmt, ...)
  __attribute__((format(printf, 5, 6)));
static void arm_timer(conn *c, uint64_t deadline);
static void poll_cb(uv_poll_t *h, int status, int events);
static void update_ref(conn *c);
static void timer_cb(uv_timer_t *t);

static uint64_t now_ms(void) { return uv_now(rbe_loop()); }

static uint64_t deadline_after(double secs) {
  if (secs <= 0) return 0;
  uint64_t d = now_ms() + rbe_duration_ms(secs);
  return d ? d : 1;
}

/* "1.5s", "250ms", "2m" for messages */
static const char *fmt_secs(double s, char *buf, size_t n) {
  if (s < 1) snprintf(buf, n, "%gms", s * 1000);
  else snprintf(buf, n, "%gs", s);
  return buf;
}

/* ---- reply objects ----
 * Our own reader functions build standard redisReply trees (hiredis's
 * pub/sub code reads them), but each reply is one allocation: the string
 * or the element vector follows the struct.  And a callback may keep
 * ("steal") its reply: freeObject, which hiredis calls right after the
 * callback, then leaves it alone. */

static void reply_free(void *obj) {
  redisReply *r = obj;
  if (!r) return;
  if (r->type == REDIS_REPLY_ARRAY)
    for (size_t i = 0; i < r->elements; i++) reply_free(r->element[i]);
  free(r);
}

static void steal_free(void *obj) {
  if (obj && obj == S.stolen) {
    S.stolen = NULL;
    return;
  }
  reply_free(obj);
}

static redisReply *steal(redisReply *r) {
  S.stolen = r;
  return r;
}

static void *link_parent(const redisReadTask *task, redisReply *r) {
  if (task->parent) {
    redisReply *parent = task->parent->obj;
    parent->element[task->idx] = r;
  }
  return r;
}

static void *create_string(const redisReadTask *task, char *str, size_t len) {
  redisReply *r = malloc(sizeof *r + len + 1);
  if (!r) return NULL;
  memset(r, 0, sizeof *r);
  r->type = task->type;
  r->str = (char *)(r + 1);
  memcpy(r->str, str, len);
  r->str[len] = 0;
  r->len = len;
  return link_parent(task, r);
}

static void *create_array(const redisReadTask *task, int elements) {
  size_t n = elements > 0 ? (size_t)elements : 0;
  redisReply *r = malloc(sizeof *r + n * sizeof(redisReply *));
  if (!r) return NULL;
  memset(r, 0, sizeof *r);
  r->type = REDIS_REPLY_ARRAY;
  r->elements = n;
  r->element = (redisReply **)(r + 1);
  memset(r->element, 0, n * sizeof(redisReply *));
  return link_parent(task, r);
}

static void *create_integer(const redisReadTask *task, long long value) {
  redisReply *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->type = REDIS_REPLY_INTEGER;
  r->integer = value;
  return link_parent(task, r);
}

static void *create_nil(const redisReadTask *task) {
  redisReply *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->type = REDIS_REPLY_NIL;
  return link_parent(task, r);
}

static redisReplyObjectFunctions reply_fns = {
  create_string, create_array, create_integer, create_nil, steal_free
};

/* ---- requests ---- */

static req *req_new(conn *c, int kind, int n) {
  req *q = calloc(1, sizeof *q);
  if (!q) return NULL;
  if (kind != RQ_CALL && n > 0) {
    q->replies = calloc((size_t)n, sizeof *q->replies);
    if (!q->replies) { free(q); return NULL; }
  }
  q->c = c;
  q->kind = kind;
  q->n = n;
  c->refs++;
  S.reqs++;
  return q;
}

static void req_link(conn *c, req *q) {
  q->prev = c->tail;
  q->next = NULL;
  if (c->tail) c->tail->next = q;
  else c->head = q;
  c->tail = q;
  c->inflight++;
  if (q->deadline) arm_timer(c, q->deadline);
  update_ref(c);
}

static void req_unlink(conn *c, req *q) {
  if (q->prev) q->prev->next = q->next;
  else if (c->head == q) c->head = q->next;
  if (q->next) q->next->prev = q->prev;
  else if (c->tail == q) c->tail = q->prev;
  q->prev = q->next = NULL;
  c->inflight--;
  update_ref(c);
}

static void req_free(req *q) {
  conn *c = q->c;
  if (q->one) reply_free(q->one);
  if (q->replies) {
    for (int i = 0; i < q->n; i++)
      if (q->replies[i]) reply_free(q->replies[i]);
    free(q->replies);
  }
  free(q);
  S.reqs--;
  c->refs--;
  conn_maybe_free(c);
}

/* ---- errors ---- */

/* Record why the connection is (being) closed; the first cause wins. */
static void set_err(conn *c, const char *kind, const char *code,
                    int retryable, const char *msg) {
  if (c->err_set) return;
  c->err_set = 1;
  c->err_retryable = retryable;
  snprintf(c->err_kind, sizeof c->err_kind, "%s", kind);
  snprintf(c->err_code, sizeof c->err_code, "%s", code);
  snprintf(c->err_msg, sizeof c->err_msg, "%s", msg);
}

/* The error code of an error reply: its first word when that is an upper
 * case token (WRONGTYPE, NOSCRIPT, ...), else "ERR". */
static void reply_code(const char *s, size_t len, char *out, size_t n) {
  size_t i = 0;
  while (i < len && i + 1 < n &&
         ((s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= '0' && s[i] <= '9') ||
          s[i] == '_' || s[i] == '-'))
    i++;
  if (i == 0 || (i < len && s[i] != ' ') || i + 1 >= n) {
    snprintf(out, n, "ERR");
    return;
  }
  memcpy(out, s, i);
  out[i] = 0;
}

static int code_retryable(const char *code) {
  static const char *const r[] = {"LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN",
                                  "CLUSTERDOWN", "READONLY", NULL};
  for (int i = 0; r[i]; i++)
    if (strcmp(r[i], code) == 0) return 1;
  return 0;
}

/* Push the error object of an error reply (not raised). */
static void push_reply_error(lua_State *L, const char *cmd, redisReply *r) {
  char code[32];
  reply_code(r->str, r->len, code, sizeof code);
  rbe_error_push(L, "redis", code_retryable(code), "%s: %s", cmd, r->str);
  rbe_error_code_str(L, code);
  lua_pushstring(L, cmd);
  lua_setfield(L, -2, "command");
}

/* Push the error object of a request that lost its connection. */
static void push_conn_error(lua_State *L, conn *c, const char *cmd) {
  if (!c->err_set)
    set_err(c, "redis", "ECONNRESET", 1, "connection lost");
  if (cmd)
    rbe_error_push(L, c->err_kind, c->err_retryable, "%s: %s", cmd,
                   c->err_msg);
  else
    rbe_error_push(L, c->err_kind, c->err_retryable, "%s", c->err_msg);
  rbe_error_code_str(L, c->err_code);
  if (cmd) {
    lua_pushstring(L, cmd);
    lua_setfield(L, -2, "command");
  }
}

/* ---- reply -> Lua ---- */

static void push_reply(lua_State *L, redisReply *r, const char *cmd) {
  switch (r->type) {
  case REDIS_REPLY_STRING:
  case REDIS_REPLY_STATUS:
    lua_pushlstring(L, r->str, r->len);
    break;
  case REDIS_REPLY_INTEGER:
    lua_pushinteger(L, (lua_Integer)r->integer);
    break;
  case REDIS_REPLY_NIL:
    rbe_push_null(L);
    break;
  case REDIS_REPLY_ERROR:
    push_reply_error(L, cmd, r);
    break;
  case REDIS_REPLY_ARRAY:
    luaL_checkstack(L, 4, "redis reply nested too deep");
    lua_createtable(L, r->elements > INT32_MAX ? 0 : (int)r->elements, 0);
    for (size_t i = 0; i < r->elements; i++) {
      push_reply(L, r->element[i], cmd);
      lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    break;
  default:
    lua_pushnil(L);
  }
}

/* ---- the event adapter ---- */

static void apply_mask(conn *c) {
  if (!c->handles_open) return;
  int m = 0;
  if (c->want_read && !c->paused) m |= UV_READABLE;
  if (c->want_write && (!c->connected || c->blocked)) m |= UV_WRITABLE;
  if (m == c->mask) return;
  c->mask = m;
  if (m) uv_poll_start(&c->poll, m, poll_cb);
  else uv_poll_stop(&c->poll);
}

/* An idle connection does not keep the loop (and so rbe) alive; one with
 * requests in flight, a task waiting for a message or a connect under way
 * does. */
static void update_ref(conn *c) {
  if (!c->handles_open) return;
  if (c->inflight || c->sub_w || !c->connected) uv_ref((uv_handle_t *)&c->poll);
  else uv_unref((uv_handle_t *)&c->poll);
}

static void after_hiredis(conn *c) {
  if (c->in_hiredis || !c->close_pending) return;
  c->close_pending = 0;
  if (c->ac) {
    redisAsyncContext *ac = c->ac;
    c->in_hiredis++;
    redisAsyncFree(ac);
    c->in_hiredis--;
  }
}

static void poll_cb(uv_poll_t *h, int status, int events) {
  conn *c = h->data;
  if (!c->ac) return;
  if (status < 0) {
    /* libuv reports EPOLLERR (a refused connect, a reset) as UV_EBADF and
     * stops watching: let hiredis read the socket's own error */
    c->mask = 0;
    c->in_hiredis++;
    if (c->connected) redisAsyncHandleRead(c->ac);
    else redisAsyncHandleWrite(c->ac);
    c->in_hiredis--;
    if (c->ac)
      conn_close(c, "redis", uv_err_name(status), 1,
                 "connection to %s failed: %s", c->desc, uv_strerror(status));
    return;
  }
  c->in_hiredis++;
  if (events & UV_READABLE) redisAsyncHandleRead(c->ac);
  /* once connected, writes go through the flush (prepare_cb); the poll
   * waits for room only when a flush could not write everything */
  if (c->ac && (events & UV_WRITABLE)) redisAsyncHandleWrite(c->ac);
  c->in_hiredis--;
  if (c->ac) apply_mask(c);
  after_hiredis(c);
}

/* Once per loop turn, before polling: write what the tasks queued. */
static void prepare_cb(uv_prepare_t *h) {
  conn *c = h->data;
  uv_prepare_stop(h);
  if (!c->ac || !c->want_write || !c->connected || c->blocked) return;
  c->in_hiredis++;
  redisAsyncHandleWrite(c->ac);
  c->in_hiredis--;
  if (c->ac && c->want_write) c->blocked = 1;
  if (c->ac) apply_mask(c);
  after_hiredis(c);
}

static void ev_add_read(void *p) {
  conn *c = p;
  c->want_read = 1;
  apply_mask(c);
}

static void ev_del_read(void *p) {
  conn *c = p;
  c->want_read = 0;
  apply_mask(c);
}

static void ev_add_write(void *p) {
  conn *c = p;
  c->want_write = 1;
  if (c->connected && !c->blocked && c->handles_open)
    uv_prepare_start(&c->prepare, prepare_cb);
  apply_mask(c);
}

static void ev_del_write(void *p) {
  conn *c = p;
  c->want_write = 0;
  c->blocked = 0;
  apply_mask(c);
}

static void handle_close_cb(uv_handle_t *h) {
  conn *c = h->data;
  rbe_counts[RBE_COUNT_HANDLES]--;
  c->handles--;
  conn_maybe_free(c);
}

static void close_handles(conn *c) {
  if (!c->handles_open) return;
  c->handles_open = 0;
  uv_close((uv_handle_t *)&c->poll, handle_close_cb);
  uv_close((uv_handle_t *)&c->timer, handle_close_cb);
  uv_close((uv_handle_t *)&c->prepare, handle_close_cb);
}

/* hiredis is freeing the context: nothing may touch it any more */
static void ev_cleanup(void *p) {
  conn *c = p;
  c->ac = NULL;
  close_handles(c);
}

static void wake_sub(conn *c);

/* The connect callback: called once, from inside hiredis. */
static void on_connect(const redisAsyncContext *ac, int status) {
  conn *c = ac->data;
  if (status == REDIS_OK) {
    c->connected = 1;
    c->connect_deadline = 0;
    update_ref(c);
    if (c->tcp) {
      /* a dead peer is noticed even while idle; a failure here only costs
       * that, so it must not fail the connection */
      redisContext *rc = (redisContext *)&ac->c;
      if (redisEnableKeepAlive(rc) != REDIS_OK) {
        rc->err = 0;
        rc->errstr[0] = 0;
      }
    }
    return;
  }
  int e = errno;
  char msg[512];
  snprintf(msg, sizeof msg, "cannot connect to %s: %s", c->desc,
           ac->c.errstr[0] ? ac->c.errstr : strerror(e));
  const char *name = e ? strerrorname_np(e) : NULL;
  set_err(c, "redis", name ? name : "ECONNREFUSED", 1, msg);
}

/* Called after the pending callbacks got their NULL reply. */
static void on_disconnect(const redisAsyncContext *ac, int status) {
  conn *c = ac->data;
  if (status != REDIS_OK && !c->err_set) {
    char msg[512];
    snprintf(msg, sizeof msg, "connection to %s lost: %s", c->desc,
             ac->errstr ? ac->errstr : "error");
    set_err(c, "redis", "ECONNRESET", 1, msg);
  }
  wake_sub(c);
}

/* A NULL reply: the context is going away.  Note why, if nobody did. */
static void note_lost(conn *c, redisAsyncContext *ac) {
  c->dying = 1;
  if (c->err_set) return;
  char msg[512];
  const char *code = "ECONNRESET";
  if (ac->err == REDIS_ERR_IO && errno) {
    const char *n = strerrorname_np(errno);
    if (n) code = n;
  }
  snprintf(msg, sizeof msg, "connection to %s lost: %s", c->desc,
           ac->err && ac->errstr ? ac->errstr : "connection closed");
  set_err(c, "redis", code, 1, msg);
}

/* Close the connection, recording why; deferred while hiredis runs. */
static void conn_close(conn *c, const char *kind, const char *code,
                       int retryable, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  set_err(c, kind, code, retryable, msg);
  if (!c->ac) return;
  c->close_pending = 1;
  after_hiredis(c);
}

static void conn_maybe_free(conn *c) {
  if (c->ac || c->handles || c->refs || c->owned) return;
  while (c->q_head) {
    msg *m = c->q_head;
    c->q_head = m->next;
    reply_free(m->r);
    free(m);
  }
  free(c);
  S.conns--;
}

/* ---- completion ---- */

static int call_push(lua_State *L, void *ud) {
  req *q = ud;
  int n = 0;
  if (L) {
    if (q->lost || !q->one) push_conn_error(L, q->c, q->cmd);
    else if (q->one->type == REDIS_REPLY_ERROR)
      push_reply_error(L, q->cmd, q->one);
    else push_reply(L, q->one, q->cmd);
    n = 1;
  }
  req_free(q);
  return n;
}

/* pipelines: the continuation converts (it knows the commands) */
static int pipe_push(lua_State *L, void *ud) {
  req *q = ud;
  if (!L) { req_free(q); return 0; }
  if (q->lost) {
    push_conn_error(L, q->c, q->cmd);
    req_free(q);
    return 1;
  }
  lua_pushlightuserdata(L, q);
  return 1;
}

static void handshake_done(conn *c, req *q) {
  if (q->lost) return;               /* the conn already knows why */
  for (int i = 0; i < q->n; i++) {
    redisReply *r = q->replies[i];
    if (r && r->type == REDIS_REPLY_ERROR) {
      char code[32], msg[512];
      reply_code(r->str, r->len, code, sizeof code);
      snprintf(msg, sizeof msg, "cannot connect to %s: %s: %s", c->desc,
               q->names[i], r->str);
      c->hs_failed = 1;
      conn_close(c, "redis", code, code_retryable(code), "%s", msg);
      return;
    }
  }
  c->ready = 1;
}

static void reply_cb(redisAsyncContext *ac, void *r, void *priv) {
  req *q = priv;
  conn *c = q->c;
  redisReply *reply = r;
  if (!reply) {
    note_lost(c, ac);
    q->lost = 1;
  } else if (c->hs_failed && q->kind != RQ_HANDSHAKE) {
    q->lost = 1;                     /* queued behind a failed AUTH */
  } else if (q->w || q->kind == RQ_HANDSHAKE) {
    if (q->kind == RQ_CALL) q->one = steal(reply);
    else q->replies[q->got] = steal(reply);
  }
  if (++q->got < q->n) return;
  req_unlink(c, q);
  if (q->kind == RQ_HANDSHAKE) {
    handshake_done(c, q);
    req_free(q);
    return;
  }
  rbe_wait *w = q->w;
  if (!w) { req_free(q); return; }
  q->w = NULL;
  if (q->kind == RQ_CALL) {
    if (q->lost || !q->one || q->one->type == REDIS_REPLY_ERROR)
      rbe_wait_fail(w, call_push, q);
    else rbe_wait_done(w, call_push, q);
  } else {
    if (q->lost) rbe_wait_fail(w, pipe_push, q);
    else rbe_wait_done(w, pipe_push, q);
  }
}

static void req_cancel(void *ud) {
  req *q = ud;
  q->w = NULL;                       /* the reply is dropped when it comes */
  /* replies kept so far are freed with the request.  A blocking command
   * would hold the connection (and every command queued behind it) until
   * the server's block time ends: close it instead. */
  if (q->blocking)
    conn_close(q->c, "redis", "ECANCELED", 1, "connection to %s closed: a "
               "cancelled %s was blocking it", q->c->desc, q->cmd);
}

/* ---- timeouts ---- */

static void arm_timer(conn *c, uint64_t deadline) {
  if (!c->handles_open || !deadline) return;
  if (c->timer_due && c->timer_due <= deadline) return;
  c->timer_due = deadline;
  uint64_t now = now_ms();
  uv_timer_start(&c->timer, timer_cb, deadline > now ? deadline - now : 0,
                 0);
}

static void timer_cb(uv_timer_t *t) {
  conn *c = t->data;
  char b[32];
  c->timer_due = 0;
  if (!c->ac) return;
  uint64_t now = now_ms();
  if (!c->connected && c->connect_deadline && c->connect_deadline <= now) {
    conn_close(c, "timeout", "ETIMEDOUT", 1,
               "cannot connect to %s: timed out after %s", c->desc,
               fmt_secs(c->connect_timeout, b, sizeof b));
    return;
  }
  uint64_t next = c->connected ? 0 : c->connect_deadline;
  for (req *q = c->head; q; q = q->next) {
    if (!q->deadline) continue;
    if (q->deadline <= now) {
      if (q->kind == RQ_HANDSHAKE)
        conn_close(c, "timeout", "ETIMEDOUT", 1,
                   "cannot connect to %s: no reply to %s within %s",
                   c->desc, q->cmd, fmt_secs(q->timeout, b, sizeof b));
      else
        conn_close(c, "timeout", "ETIMEDOUT", 1,
                   "no reply to %s from %s within %s; connection closed "
                   "(the protocol position is unknown)", q->cmd, c->desc,
                   fmt_secs(q->timeout, b, sizeof b));
      return;
    }
    if (!next || q->deadline < next) next = q->deadline;
  }
  if (c->sub_w && c->sub_deadline) {
    if (c->sub_deadline <= now) wake_sub(c);
    else if (!next || c->sub_deadline < next) next = c->sub_deadline;
  }
  if (next) arm_timer(c, next);
}

/* ---- commands, formatted straight into the protocol ---- */

typedef struct {
  char *p;
  size_t len, cap;
} buf_t;

/* Single calls are formatted here; hiredis copies the command into its
 * output buffer before the next one is formatted. */
static buf_t F;

static int buf_reserve(buf_t *b, size_t extra) {
  if (b->cap - b->len >= extra) return 0;
  size_t cap = b->cap ? b->cap : 1024;
  while (cap - b->len < extra) cap *= 2;
  char *p = realloc(b->p, cap);
  if (!p) return -1;
  b->p = p;
  b->cap = cap;
  return 0;
}

/* "<tag><n>\r\n"; the caller reserved 24 bytes */
static void buf_count(buf_t *b, char tag, size_t n) {
  char *p = b->p + b->len;
  *p++ = tag;
  if (n < 10) {
    *p++ = (char)('0' + n);
  } else if (n < 100) {
    *p++ = (char)('0' + n / 10);
    *p++ = (char)('0' + n % 10);
  } else {
    char tmp[24];
    int k = 0;
    do { tmp[k++] = (char)('0' + n % 10); n /= 10; } while (n);
    while (k) *p++ = tmp[--k];
  }
  *p++ = '\r';
  *p++ = '\n';
  b->len = (size_t)(p - b->p);
}

/* Always followed by a NUL (not counted): hiredis parses the formatted
 * command with strchr, as if it were a C string. */
static int buf_bulk(buf_t *b, const char *s, size_t len) {
  if (buf_reserve(b, len + 32) < 0) return -1;
  buf_count(b, '$', len);
  memcpy(b->p + b->len, s, len);
  b->len += len;
  b->p[b->len++] = '\r';
  b->p[b->len++] = '\n';
  b->p[b->len] = 0;
  return 0;
}

/* Format a float so that it reads back as the same double. */
static int fmt_float(char *buf, size_t n, double v) {
  if (isnan(v)) return -1;
  if (isinf(v)) return snprintf(buf, n, v > 0 ? "inf" : "-inf");
  for (int prec = 15; prec <= 17; prec++) {
    snprintf(buf, n, "%.*g", prec, v);
    if (strtod(buf, NULL) == v) break;
  }
  return (int)strlen(buf);
}

/* Argument at idx as bytes: strings, numbers and rbe.secret values.
 * Returns NULL (with *why set) for anything else.  Numbers are written to
 * num (40 bytes). */
static const char *arg_bytes(lua_State *L, int idx, char *num, size_t *len,
                             const char **why) {
  int t = lua_type(L, idx);
  if (t == LUA_TSTRING) return lua_tolstring(L, idx, len);
  if (t == LUA_TNUMBER) {
    if (lua_isinteger(L, idx)) {
      *len = (size_t)snprintf(num, 40, "%lld", (long long)lua_tointeger(L, idx));
      return num;
    }
    int n = fmt_float(num, 40, lua_tonumber(L, idx));
    if (n < 0) { *why = "NaN is not a valid argument"; return NULL; }
    *len = (size_t)n;
    return num;
  }
  if (t == LUA_TUSERDATA && luaL_testudata(L, idx, RBE_SECRET_MT)) {
    lua_getiuservalue(L, idx, 1);
    const char *s = NULL;
    if (lua_type(L, -1) == LUA_TSTRING) s = lua_tolstring(L, -1, len);
    else if (lua_type(L, -1) == LUA_TNUMBER)
      s = arg_bytes(L, lua_gettop(L), num, len, why);
    /* the string stays alive: the secret references it */
    lua_pop(L, 1);
    if (!s && !*why) *why = "a secret must hold a string or a number";
    return s;
  }
  if (t == LUA_TNIL || t == LUA_TNONE) *why = "nil argument";
  else if (t == LUA_TBOOLEAN) *why = "boolean argument (pass \"1\"/\"0\" or a string)";
  else if (t == LUA_TTABLE) *why = "table argument (use table.unpack)";
  else *why = "unsupported argument type";
  return NULL;
}

/* Commands that change how replies flow: hiredis would route their
 * replies elsewhere (pub/sub, monitor) or none would come. */
static const char *refused(const char *name, size_t len) {
  static const char *const subs[] = {"SUBSCRIBE", "PSUBSCRIBE", "UNSUBSCRIBE",
                                     "PUNSUBSCRIBE", "SSUBSCRIBE",
                                     "SUNSUBSCRIBE", NULL};
  if (len < 7 || len > 12) return NULL;
  for (int i = 0; subs[i]; i++)
    if (strlen(subs[i]) == len && strncasecmp(subs[i], name, len) == 0)
      return "use r:subscribe()/r:psubscribe(), which open a dedicated "
             "connection";
  if (len == 7 && strncasecmp(name, "MONITOR", 7) == 0)
    return "MONITOR is not supported (it streams replies forever)";
  return NULL;
}

static void copy_cmd(char *dst, size_t n, const char *s, size_t len) {
  size_t i = 0;
  for (; i < len && i + 1 < n; i++) {
    char ch = s[i];
    dst[i] = (ch >= 'a' && ch <= 'z') ? (char)(ch - 32)
           : (ch >= ' ' && ch < 127) ? ch : '?';
  }
  dst[i] = 0;
}

/* Append one command to b: its name at stack index nidx (0: the first
 * argument is the name), then the nargs arguments from stack index first.
 * cmd (32 bytes) gets the name.  A bad argument leaves b as it was and
 * raises an error naming `what` and the argument (the name is #1).
 * Commands refused() are refused unless `any`. */
static void format_cmd(lua_State *L, buf_t *b, int nidx, int first, int nargs,
                       const char *what, char *cmd, int any) {
  size_t start = b->len;
  char num[40];
  int argc = nargs + (nidx ? 1 : 0);
  cmd[0] = 0;
  if (argc < 1) luaL_error(L, "%s: command name expected", what);
  if (buf_reserve(b, 32) < 0) luaL_error(L, "%s: out of memory", what);
  buf_count(b, '*', (size_t)argc);
  for (int i = 0; i < argc; i++) {
    int idx = !nidx ? first + i : i == 0 ? nidx : first + i - 1;
    const char *why = NULL;
    size_t len = 0;
    const char *s = arg_bytes(L, idx, num, &len, &why);
    if (!s) {
      b->len = start;
      b->p[start] = 0;
      if (i == 0) luaL_error(L, "%s: command name expected (%s)", what, why);
      luaL_error(L, "%s %s: argument #%d: %s", what, cmd, i + 1, why);
    }
    /* hiredis 0.14 reads RESP2 only: HELLO 3 would break the connection */
    if (i == 1 && !any && strcmp(cmd, "HELLO") == 0 &&
        !(len == 1 && s[0] == '2')) {
      b->len = start;
      b->p[start] = 0;
      luaL_error(L, "%s HELLO: only protocol 2 (RESP2) is supported "
                 "(hiredis 0.14 cannot read RESP3)", what);
    }
    if (i == 0) {
      copy_cmd(cmd, 32, s, len);
      const char *no = any ? NULL : refused(s, len);
      if (no) {
        b->len = start;
      b->p[start] = 0;
        luaL_error(L, "%s %s: %s", what, cmd, no);
      }
    }
    if (buf_bulk(b, s, len) < 0) {
      b->len = start;
      b->p[start] = 0;
      luaL_error(L, "%s: out of memory", what);
    }
  }
}

/* The name of the formatted command at s: "*N\r\n$L\r\nNAME\r\n..." */
static void formatted_name(const char *s, char *cmd, size_t n) {
  const char *p = strchr(s, '$');
  size_t len = p ? strtoul(p + 1, NULL, 10) : 0;
  p = p ? strchr(p, '\n') : NULL;
  if (!p) { snprintf(cmd, n, "?"); return; }
  copy_cmd(cmd, n, p + 1, len);
}

/* ---- the pipeline recorder: commands formatted as they are recorded ---- */

#define PIPE_MT "rbe.redis.pipeline"

typedef struct {
  buf_t b;
  size_t *offs;            /* command i is b.p[offs[i] .. offs[i + 1]) */
  int n, capn;
  int sent;
} pipe_t;

/* The metatables of our two userdata types, compared by address (they are
 * anchored in the registry and tables never move): luaL_checkudata would
 * look the name up in the registry at every call of the hot paths. */
static const void *pipe_mt, *conn_mt;

static void *check_type(lua_State *L, int idx, const void *mt,
                        const char *tname) {
  void *u = lua_touserdata(L, idx);
  if (u && lua_getmetatable(L, idx)) {
    int ok = lua_topointer(L, -1) == mt;
    lua_pop(L, 1);
    if (ok) return u;
  }
  return luaL_checkudata(L, idx, tname);   /* raises the usual error */
}

static pipe_t *check_pipe(lua_State *L, int idx) {
  return check_type(L, idx, pipe_mt, PIPE_MT);
}

static int pipe_add(lua_State *L, int nidx) {
  pipe_t *p = check_pipe(L, 1);
  if (p->sent)
    return luaL_error(L, "redis pipeline: already sent (record commands "
                      "inside the function given to pipeline())");
  if (p->n + 2 > p->capn) {
    int cap = p->capn ? p->capn * 2 : 64;
    size_t *o = realloc(p->offs, (size_t)cap * sizeof *o);
    if (!o) return luaL_error(L, "redis pipeline: out of memory");
    p->offs = o;
    p->capn = cap;
  }
  char cmd[32];
  size_t start = p->b.len;
  format_cmd(L, &p->b, nidx, 2, lua_gettop(L) - 1, "redis pipeline", cmd, 0);
  p->offs[p->n++] = start;
  p->offs[p->n] = p->b.len;
  lua_pushinteger(L, p->n);
  return 1;
}

/* p:call(cmd, ...) -> the slot of its reply */
static int pipe_call(lua_State *L) {
  return pipe_add(L, 0);
}

/* p:get(k), p:set(k, v), ...: upvalue 1 is the command name */
static int pipe_sugar(lua_State *L) {
  return pipe_add(L, lua_upvalueindex(1));
}

/* p:count() -> number of commands recorded */
static int pipe_count(lua_State *L) {
  lua_pushinteger(L, check_pipe(L, 1)->n);
  return 1;
}

/* A method name usable as a command: letters and digits, starting with a
 * letter.  Writes it upper-cased to out (64 bytes). */
static int sugar_name(const char *k, size_t len, char *out) {
  if (len == 0 || len >= 64) return 0;
  if (!((k[0] >= 'a' && k[0] <= 'z') || (k[0] >= 'A' && k[0] <= 'Z')))
    return 0;
  for (size_t i = 0; i < len; i++) {
    char ch = k[i];
    if (ch >= 'a' && ch <= 'z') out[i] = (char)(ch - 32);
    else if ((ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9')) out[i] = ch;
    else return 0;
  }
  out[len] = 0;
  return 1;
}

/* __index of the methods table: a command function made on first use
 * and kept there, so later lookups are plain table hits */
static int pipe_index(lua_State *L) {
  /* stack: methods, key */
  size_t len;
  char name[64];
  if (lua_type(L, 2) != LUA_TSTRING) return 0;
  const char *k = lua_tolstring(L, 2, &len);
  if (!sugar_name(k, len, name)) return 0;
  lua_pushstring(L, name);
  lua_pushcclosure(L, pipe_sugar, 1);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, -2);
  lua_rawset(L, 1);
  return 1;
}

static void pipe_release(pipe_t *p) {
  free(p->b.p);
  free(p->offs);
  memset(&p->b, 0, sizeof p->b);
  p->offs = NULL;
  p->capn = 0;
}

static int pipe_gc(lua_State *L) {
  pipe_release(check_pipe(L, 1));
  return 0;
}

/* core.pipeline() -> an empty recorder */
static int l_pipeline(lua_State *L) {
  pipe_t *p = lua_newuserdatauv(L, sizeof *p, 0);
  memset(p, 0, sizeof *p);
  luaL_setmetatable(L, PIPE_MT);
  return 1;
}

/* ---- the userdata ---- */

static conn_ud *check_ud(lua_State *L, int idx) {
  return check_type(L, idx, conn_mt, CONN_MT);
}

static conn *check_conn(lua_State *L, int idx) {
  conn_ud *u = check_ud(L, idx);
  if (!u->c) luaL_error(L, "redis connection is gone");
  return u->c;
}

static int conn_usable(conn *c) {
  return c->ac && !c->close_pending && !c->hs_failed && !c->dying;
}

/* Raise the error that closed c (not usable any more). */
static int raise_closed(lua_State *L, conn *c, const char *cmd) {
  if (!c->err_set)
    set_err(c, "closed", "CLOSED", 0, "connection is closed");
  push_conn_error(L, c, cmd);
  return lua_error(L);
}

/* Grow hiredis's output buffer once for n more bytes: appending command
 * by command would reallocate it several times per pipeline. */
static void reserve_obuf(conn *c, size_t n) {
  redisContext *rc = &c->ac->c;
  if (sdsavail(rc->obuf) >= n) return;
  sds ob = sdsMakeRoomFor(rc->obuf, n);
  if (ob) rc->obuf = ob;
}

static int issue(conn *c, req *q, int argc, const char **argv,
                 const size_t *lens) {
  return redisAsyncCommandArgv(c->ac, reply_cb, q, argc, argv, lens);
}

static void start_req(conn *c, req *q, double timeout) {
  q->timeout = timeout;
  q->deadline = deadline_after(timeout);
  req_link(c, q);
}

static int call_common(lua_State *L, int first, double timeout,
                       int blocking) {
  conn *c = check_conn(L, 1);
  char cmd[32];
  F.len = 0;
  format_cmd(L, &F, 0, first, lua_gettop(L) - first + 1, "redis", cmd, 0);
  if (c->sub)
    return luaL_error(L, "redis %s: this connection is subscribed (pub/sub)",
                      cmd);
  if (!conn_usable(c)) return raise_closed(L, c, cmd);
  rbe_wait *w = rbe_wait_new(L, "redis call");
  req *q = req_new(c, RQ_CALL, 1);
  if (!q) return luaL_error(L, "redis %s: out of memory", cmd);
  memcpy(q->cmd, cmd, sizeof cmd);
  q->blocking = blocking;
  if (redisAsyncFormattedCommand(c->ac, reply_cb, q, F.p, F.len) != REDIS_OK) {
    req_free(q);
    return raise_closed(L, c, cmd);
  }
  /* past this point nothing raises */
  q->w = w;
  start_req(c, q, timeout);
  return rbe_wait_yield(L, w, req_cancel, q);
}

/* conn:call(cmd, ...) -> reply  [yields]
 * Uses the connection's default timeout; an error reply raises. */
static int conn_call(lua_State *L) {
  conn *c = check_conn(L, 1);
  return call_common(L, 2, c->timeout, 0);
}

/* conn:callt(timeout, cmd, ...) -> reply  [yields]
 * timeout: seconds, 0 or false for none. */
static int conn_callt(lua_State *L) {
  double t = 0;
  if (lua_toboolean(L, 2)) t = rbe_check_duration(L, 2, "redis call");
  return call_common(L, 3, t, 0);
}

/* conn:callblock(timeout, cmd, ...) -> reply  [yields]
 * A blocking command (BLPOP, XREAD BLOCK, ...): like callt, but when the
 * waiting task is cancelled the connection is closed. */
static int conn_callblock(lua_State *L) {
  double t = 0;
  if (lua_toboolean(L, 2)) t = rbe_check_duration(L, 2, "redis call");
  return call_common(L, 3, t, 1);
}

static int has_error(redisReply *r) {
  if (!r || r->type == REDIS_REPLY_ERROR) return 1;
  if (r->type == REDIS_REPLY_ARRAY)
    for (size_t i = 0; i < r->elements; i++)
      if (has_error(r->element[i])) return 1;
  return 0;
}

static int pipeline_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  rbe_wait_values(L, ctx);              /* raises if the connection died */
  req *q = lua_touserdata(L, -1);
  lua_pop(L, 1);
  /* stack: conn, pipe, timeout */
  pipe_t *p = check_pipe(L, 2);
  lua_createtable(L, q->n, 1);
  for (int i = 0; i < q->n; i++) {
    redisReply *r = q->replies[i];
    char cmd[32] = "?";
    /* the command's name is needed for error messages only */
    if (has_error(r) && p->b.p) formatted_name(p->b.p + p->offs[i], cmd,
                                               sizeof cmd);
    if (!r) {
      push_conn_error(L, q->c, cmd);
    } else {
      push_reply(L, r, cmd);
      if (r->type == REDIS_REPLY_ERROR) {
        lua_pushinteger(L, i + 1);
        lua_setfield(L, -2, "index");
      }
    }
    lua_rawseti(L, -2, i + 1);
  }
  lua_pushinteger(L, q->n);
  lua_setfield(L, -2, "n");
  req_free(q);
  pipe_release(p);
  return 1;
}

/* conn:pipeline(p[, timeout]) -> replies  [yields]
 * Sends every command recorded in p (core.pipeline()) at once; replies
 * come back in order, error replies as error objects in their slot.
 * timeout covers the whole pipeline. */
static int conn_pipeline(lua_State *L) {
  conn *c = check_conn(L, 1);
  pipe_t *p = check_pipe(L, 2);
  double timeout = c->timeout;
  if (!lua_isnoneornil(L, 3))
    timeout = lua_toboolean(L, 3) ? rbe_check_duration(L, 3, "redis pipeline")
                                  : 0;
  lua_settop(L, 3);
  if (p->sent) return luaL_error(L, "redis pipeline: already sent");
  if (p->n == 0) {
    p->sent = 1;
    lua_createtable(L, 0, 1);
    lua_pushinteger(L, 0);
    lua_setfield(L, -2, "n");
    return 1;
  }
  if (c->sub)
    return luaL_error(L, "redis pipeline: this connection is subscribed "
                      "(pub/sub)");
  if (!conn_usable(c)) return raise_closed(L, c, "pipeline");
  rbe_wait *w = rbe_wait_new(L, "redis pipeline");
  req *q = req_new(c, RQ_PIPE, p->n);
  if (!q) return luaL_error(L, "redis pipeline: out of memory");
  snprintf(q->cmd, sizeof q->cmd, "pipeline");
  /* past this point nothing raises */
  p->sent = 1;
  reserve_obuf(c, p->b.len);
  int sent = 0;
  for (int i = 0; i < p->n; i++) {
    if (redisAsyncFormattedCommand(c->ac, reply_cb, q, p->b.p + p->offs[i],
                                   p->offs[i + 1] - p->offs[i]) != REDIS_OK)
      break;
    sent++;
  }
  if (sent == 0) {
    req_free(q);
    return raise_closed(L, c, "pipeline");
  }
  if (sent < q->n) {
    /* cannot happen on a usable connection; fail like a lost one */
    q->n = sent;
    q->lost = 1;
  }
  q->w = w;
  start_req(c, q, timeout);
  return rbe_wait_yieldk(L, w, req_cancel, q, pipeline_k);
}

/* conn:alive() -> boolean: usable for new commands */
static int conn_alive(lua_State *L) {
  conn *c = check_conn(L, 1);
  lua_pushboolean(L, conn_usable(c));
  return 1;
}

/* conn:state() -> "connecting"|"ready"|"closed" */
static int conn_state(lua_State *L) {
  conn *c = check_conn(L, 1);
  if (!conn_usable(c)) lua_pushliteral(L, "closed");
  else if (!c->connected || !c->ready) lua_pushliteral(L, "connecting");
  else lua_pushliteral(L, "ready");
  return 1;
}

/* conn:error() -> the error object that closed it, or nil */
static int conn_error(lua_State *L) {
  conn *c = check_conn(L, 1);
  if (conn_usable(c) || !c->err_set) { lua_pushnil(L); return 1; }
  push_conn_error(L, c, NULL);
  return 1;
}

/* conn:inflight() -> number of requests awaiting replies */
static int conn_inflight(lua_State *L) {
  lua_pushinteger(L, check_conn(L, 1)->inflight);
  return 1;
}

static void conn_shutdown(conn *c, const char *why) {
  if (!c->ac) return;
  conn_close(c, "closed", "CLOSED", 0, "connection to %s %s", c->desc, why);
}

/* conn:close() -> nothing.  Pending requests fail with a `closed` error.
 * Closing twice is fine. */
static int conn_close_l(lua_State *L) {
  conn_ud *u = check_ud(L, 1);
  if (!u->c) return 0;
  conn_shutdown(u->c, "was closed");
  return 0;
}

static int conn_gc(lua_State *L) {
  conn_ud *u = check_ud(L, 1);
  conn *c = u->c;
  if (!c) return 0;
  u->c = NULL;
  /* nothing can wait on an unreachable connection, except at lua_close:
   * detach so no dead task is ever resumed */
  for (req *q = c->head; q; q = q->next) q->w = NULL;
  if (c->sub_w) { c->sub_w = NULL; c->refs--; }
  conn_shutdown(c, "was garbage-collected");
  c->owned = 0;
  conn_maybe_free(c);
  return 0;
}

static int conn_tostring(lua_State *L) {
  conn_ud *u = check_ud(L, 1);
  if (!u->c) lua_pushliteral(L, "redis connection (gone)");
  else lua_pushfstring(L, "redis connection %s (%s)", u->c->desc,
                       !conn_usable(u->c) ? "closed"
                       : u->c->connected && u->c->ready ? "ready"
                       : "connecting");
  return 1;
}

/* ---- pub/sub ---- */

static int sub_push_msg(lua_State *L, void *ud) {
  conn *c = ud;
  int n = 0;
  c->refs--;
  if (L) {
    msg *m = c->q_head;
    if (m) {
      c->q_head = m->next;
      if (!c->q_head) c->q_tail = NULL;
      c->q_len--;
      if (c->paused && c->q_len < MSG_QUEUE_MAX / 2) {
        c->paused = 0;
        apply_mask(c);
      }
      push_reply(L, m->r, "message");
      reply_free(m->r);
      free(m);
    } else lua_pushnil(L);
    n = 1;
  }
  conn_maybe_free(c);
  return n;
}

static int sub_push_err(lua_State *L, void *ud) {
  conn *c = ud;
  c->refs--;
  if (L) push_conn_error(L, c, "subscription");
  conn_maybe_free(c);
  return L ? 1 : 0;
}

/* Resume the task waiting for a message: with one, with the error that
 * closed the connection, or with nil when its wait timed out. */
static void wake_sub(conn *c) {
  rbe_wait *w = c->sub_w;
  if (!w) return;
  c->sub_w = NULL;
  c->sub_deadline = 0;
  update_ref(c);
  if (c->q_head || conn_usable(c)) rbe_wait_done(w, sub_push_msg, c);
  else rbe_wait_fail(w, sub_push_err, c);
}

static void sub_cb(redisAsyncContext *ac, void *r, void *priv) {
  conn *c = priv;
  redisReply *reply = r;
  if (!reply) {
    note_lost(c, ac);
    wake_sub(c);
    return;
  }
  msg *m = malloc(sizeof *m);
  if (!m) return;                    /* hiredis frees the reply */
  m->next = NULL;
  m->r = steal(reply);
  if (c->q_tail) c->q_tail->next = m;
  else c->q_head = m;
  c->q_tail = m;
  if (++c->q_len >= MSG_QUEUE_MAX && !c->paused) {
    c->paused = 1;                   /* back-pressure: stop reading */
    apply_mask(c);
  }
  wake_sub(c);
}

static void sub_cancel(void *ud) {
  conn *c = ud;
  c->sub_w = NULL;
  c->sub_deadline = 0;
  c->refs--;
  update_ref(c);
  conn_maybe_free(c);
}

/* conn:subscribe(cmd, name...) -> sent.  cmd: SUBSCRIBE, PSUBSCRIBE,
 * UNSUBSCRIBE or PUNSUBSCRIBE; the confirmations arrive as messages.
 * false: nothing was sent (an unsubscribe with nothing subscribed). */
static int conn_subscribe(lua_State *L) {
  conn *c = check_conn(L, 1);
  size_t clen;
  const char *cmd = luaL_checklstring(L, 2, &clen);
  static const char *const ok[] = {"SUBSCRIBE", "PSUBSCRIBE", "UNSUBSCRIBE",
                                   "PUNSUBSCRIBE", NULL};
  int k = -1;
  for (int i = 0; ok[i]; i++)
    if (strcasecmp(ok[i], cmd) == 0) k = i;
  if (k < 0) return luaL_error(L, "conn:subscribe: bad command '%s'", cmd);
  int argc = lua_gettop(L) - 1;
  /* an UNSUBSCRIBE without names can make hiredis 0.14 assert */
  if (argc < 2)
    return luaL_error(L, "conn:subscribe: %s needs at least one name", cmd);
  char name[32];
  F.len = 0;
  format_cmd(L, &F, 0, 2, argc, "conn:subscribe", name, 1);
  if (!conn_usable(c)) return raise_closed(L, c, "subscription");
  if (c->inflight)
    return luaL_error(L, "conn:subscribe: commands are still in flight");
  /* hiredis refuses (P)UNSUBSCRIBE once nothing is subscribed */
  int sent = (k < 2 || c->sub) &&
             redisAsyncFormattedCommand(c->ac, sub_cb, c, F.p, F.len)
               == REDIS_OK;
  if (sent) c->sub = 1;
  lua_pushboolean(L, sent);
  return 1;
}

static int message_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  return rbe_wait_values(L, ctx);
}

/* conn:message([timeout]) -> reply array of the next pub/sub message or
 * confirmation, or nil when timeout elapsed  [yields] */
static int conn_message(lua_State *L) {
  conn *c = check_conn(L, 1);
  double t = 0;
  if (lua_toboolean(L, 2)) t = rbe_check_duration(L, 2, "subscription");
  lua_settop(L, 1);
  if (c->q_head) {
    c->refs++;
    return sub_push_msg(L, c);
  }
  if (!conn_usable(c)) return raise_closed(L, c, "subscription");
  if (c->sub_w)
    return luaL_error(L, "subscription: another task is already waiting "
                      "for a message");
  rbe_wait *w = rbe_wait_new(L, "redis subscription");
  /* past this point nothing raises */
  c->sub_w = w;
  c->refs++;
  c->sub_deadline = deadline_after(t);
  arm_timer(c, c->sub_deadline);
  update_ref(c);
  return rbe_wait_yieldk(L, w, sub_cancel, c, message_k);
}

/* ---- opening ---- */

static const char *opt_str(lua_State *L, int idx, const char *name,
                           size_t *len) {
  lua_getfield(L, idx, name);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return NULL; }
  rbe_push_revealed(L, -1);
  lua_remove(L, -2);
  if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
    luaL_error(L, "redis.open: option '%s' must be a string", name);
  const char *s = lua_tolstring(L, -1, len);
  /* anchored: left on the stack until open returns */
  return s;
}

/* core.open(opts) -> conn.  Does not wait: the connection, AUTH, SELECT
 * and CLIENT SETNAME are queued; commands may be queued behind them.
 * opts: host, port | path; user, password, db, name; timeout,
 * connect_timeout (seconds, 0 = none); desc (the target for messages). */
static int l_open(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  size_t len;
  const char *host = opt_str(L, 1, "host", &len);
  const char *path = opt_str(L, 1, "path", &len);
  const char *user = opt_str(L, 1, "user", &len);
  size_t ulen = len;
  const char *pass = opt_str(L, 1, "password", &len);
  size_t plen = len;
  const char *name = opt_str(L, 1, "name", &len);
  size_t nlen = len;
  const char *desc = opt_str(L, 1, "desc", &len);
  lua_Integer port = rbe_opt_int_field(L, 1, "port", 6379);
  lua_Integer db = rbe_opt_int_field(L, 1, "db", 0);
  double timeout = 0, ctimeout = 0;
  lua_getfield(L, 1, "timeout");
  if (lua_toboolean(L, -1)) timeout = rbe_check_duration(L, -1, "timeout");
  lua_getfield(L, 1, "connect_timeout");
  if (lua_toboolean(L, -1))
    ctimeout = rbe_check_duration(L, -1, "connect_timeout");
  lua_pop(L, 2);
  if (!host && !path) return luaL_error(L, "redis.open: host or path needed");
  if (port < 1 || port > 65535)
    return luaL_error(L, "redis.open: bad port %I", port);
  if (db < 0) return luaL_error(L, "redis.open: bad db %I", db);
  if (user && !pass)
    return luaL_error(L, "redis.open: a user needs a password");
  char dbuf[256];
  if (!desc) {
    if (path) snprintf(dbuf, sizeof dbuf, "unix://%s", path);
    else snprintf(dbuf, sizeof dbuf, "redis://%s:%d", host, (int)port);
    desc = dbuf;
  }

  conn_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->c = NULL;
  luaL_setmetatable(L, CONN_MT);
  conn *c = calloc(1, sizeof *c);
  if (!c) return luaL_error(L, "redis.open: out of memory");
  S.conns++;
  snprintf(c->desc, sizeof c->desc, "%s", desc);
  c->timeout = timeout;
  c->connect_timeout = ctimeout;
  c->tcp = path == NULL;
  c->owned = 1;
  u->c = c;

  errno = 0;
  redisAsyncContext *ac = path ? redisAsyncConnectUnix(path)
                               : redisAsyncConnect(host, (int)port);
  int e = errno;
  if (!ac || ac->err) {
    char msg[512];
    snprintf(msg, sizeof msg, "cannot connect to %s: %s", c->desc,
             ac ? ac->errstr : "out of memory");
    const char *code = e ? strerrorname_np(e) : NULL;
    if (ac) redisAsyncFree(ac);
    set_err(c, "redis", code ? code : "ECONNREFUSED", 1, msg);
    push_conn_error(L, c, NULL);
    return lua_error(L);
  }
  ac->c.reader->fn = &reply_fns;
  c->ac = ac;
  ac->data = c;
  uv_loop_t *loop = rbe_loop();
  int r = uv_poll_init(loop, &c->poll, ac->c.fd);
  if (r < 0) {
    c->ac = NULL;
    redisAsyncFree(ac);
    rbe_error_push_uv(L, "redis", r, "cannot connect to %s", c->desc);
    return lua_error(L);
  }
  uv_timer_init(loop, &c->timer);
  uv_prepare_init(loop, &c->prepare);
  c->poll.data = c->timer.data = c->prepare.data = c;
  uv_unref((uv_handle_t *)&c->timer);
  uv_unref((uv_handle_t *)&c->prepare);
  c->handles = 3;
  c->handles_open = 1;
  rbe_counts[RBE_COUNT_HANDLES] += 3;

  ac->ev.data = c;
  ac->ev.addRead = ev_add_read;
  ac->ev.delRead = ev_del_read;
  ac->ev.addWrite = ev_add_write;
  ac->ev.delWrite = ev_del_write;
  ac->ev.cleanup = ev_cleanup;
  redisAsyncSetConnectCallback(ac, on_connect);
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
  c->connect_deadline = deadline_after(ctimeout);
  arm_timer(c, c->connect_deadline);

  /* the handshake, pipelined with whatever follows */
  const char *argv[4][4];
  size_t lens[4][4];
  int argc[4], n = 0;
  char dbs[32];
  const char *names[4];
  if (pass) {
    names[n] = "AUTH";
    argv[n][0] = "AUTH"; lens[n][0] = 4;
    argc[n] = 1;
    if (user) { argv[n][1] = user; lens[n][1] = ulen; argc[n]++; }
    argv[n][argc[n]] = pass; lens[n][argc[n]] = plen; argc[n]++;
    n++;
  }
  if (db) {
    names[n] = "SELECT";
    argv[n][0] = "SELECT"; lens[n][0] = 6;
    snprintf(dbs, sizeof dbs, "%d", (int)db);
    argv[n][1] = dbs; lens[n][1] = strlen(dbs);
    argc[n] = 2;
    n++;
  }
  if (name) {
    names[n] = "CLIENT SETNAME";
    argv[n][0] = "CLIENT"; lens[n][0] = 6;
    argv[n][1] = "SETNAME"; lens[n][1] = 7;
    argv[n][2] = name; lens[n][2] = nlen;
    argc[n] = 3;
    n++;
  }
  if (n == 0) {
    c->ready = 1;
  } else {
    req *q = req_new(c, RQ_HANDSHAKE, n);
    if (!q) {
      conn_shutdown(c, "could not be set up (out of memory)");
      return luaL_error(L, "redis.open: out of memory");
    }
    snprintf(q->cmd, sizeof q->cmd, "%s", names[0]);
    for (int i = 0; i < n; i++) {
      snprintf(q->names[i], sizeof q->names[i], "%s", names[i]);
      issue(c, q, argc[i], argv[i], lens[i]);
    }
    q->timeout = ctimeout;
    q->deadline = c->connect_deadline;
    req_link(c, q);
  }
  return 1;
}

/* ---- SHA1 (FIPS 180-4), for EVALSHA ---- */

static uint32_t rol32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const unsigned char *p) {
  uint32_t w[80];
  for (int i = 0; i < 16; i++)
    w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
           (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
  for (int i = 16; i < 80; i++)
    w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
  uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
  for (int i = 0; i < 80; i++) {
    uint32_t f, k;
    if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999u; }
    else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1u; }
    else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDCu; }
    else { f = b ^ c ^ d; k = 0xCA62C1D6u; }
    uint32_t t = rol32(a, 5) + f + e + k + w[i];
    e = d; d = c; c = rol32(b, 30); b = a; a = t;
  }
  h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
}

static void sha1(const unsigned char *s, size_t len, unsigned char out[20]) {
  uint32_t h[5] = {0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u,
                   0xC3D2E1F0u};
  size_t i = 0;
  for (; i + 64 <= len; i += 64) sha1_block(h, s + i);
  unsigned char blk[128];
  size_t rest = len - i;
  memset(blk, 0, sizeof blk);
  memcpy(blk, s + i, rest);
  blk[rest] = 0x80;
  size_t total = rest + 1 + 8 <= 64 ? 64 : 128;
  uint64_t bits = (uint64_t)len * 8;
  for (int k = 0; k < 8; k++)
    blk[total - 1 - k] = (unsigned char)(bits >> (8 * k));
  sha1_block(h, blk);
  if (total == 128) sha1_block(h, blk + 64);
  for (int k = 0; k < 5; k++) {
    out[4 * k] = (unsigned char)(h[k] >> 24);
    out[4 * k + 1] = (unsigned char)(h[k] >> 16);
    out[4 * k + 2] = (unsigned char)(h[k] >> 8);
    out[4 * k + 3] = (unsigned char)h[k];
  }
}

/* core.sha1hex(s) -> 40 lower-case hex digits */
static int l_sha1hex(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  unsigned char d[20];
  char hex[41];
  sha1((const unsigned char *)s, len, d);
  for (int i = 0; i < 20; i++) snprintf(hex + 2 * i, 3, "%02x", d[i]);
  lua_pushlstring(L, hex, 40);
  return 1;
}

/* core._stats() -> {conns = structs alive, reqs = requests alive} */
static int l_stats(lua_State *L) {
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, S.conns);
  lua_setfield(L, -2, "conns");
  lua_pushinteger(L, S.reqs);
  lua_setfield(L, -2, "reqs");
  return 1;
}

static int module_gc(lua_State *L) {
  (void)L;
  free(F.p);
  memset(&F, 0, sizeof F);
  return 0;
}

static const luaL_Reg conn_methods[] = {
  {"call", conn_call},
  {"callt", conn_callt},
  {"callblock", conn_callblock},
  {"pipeline", conn_pipeline},
  {"subscribe", conn_subscribe},
  {"message", conn_message},
  {"alive", conn_alive},
  {"state", conn_state},
  {"error", conn_error},
  {"inflight", conn_inflight},
  {"close", conn_close_l},
  {NULL, NULL}
};

static const luaL_Reg redis_funcs[] = {
  {"open", l_open},
  {"pipeline", l_pipeline},
  {"sha1hex", l_sha1hex},
  {"_stats", l_stats},
  {NULL, NULL}
};

int luaopen_rbe_redis(lua_State *L) {
  /* lua_close unloads C libraries (dlclose) after the finalizers ran, but
   * the close callbacks of the handles those finalizers closed run later,
   * in main's last uv_run: keep this library mapped until exit */
  Dl_info info;
  if (dladdr((void *)luaopen_rbe_redis, &info) && info.dli_fname)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  if (luaL_newmetatable(L, CONN_MT)) {
    luaL_newlib(L, conn_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, conn_close_l);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, conn_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, conn_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  conn_mt = lua_topointer(L, -1);
  lua_pop(L, 1);
  if (luaL_newmetatable(L, PIPE_MT)) {
    lua_createtable(L, 0, 8);              /* the methods */
    lua_pushcfunction(L, pipe_call);
    lua_setfield(L, -2, "call");
    lua_pushcfunction(L, pipe_count);
    lua_setfield(L, -2, "count");
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, pipe_index);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, -2);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, pipe_gc);
    lua_setfield(L, -2, "__gc");
  }
  pipe_mt = lua_topointer(L, -1);
  lua_pop(L, 1);
  luaL_newlib(L, redis_funcs);
  /* frees the module's buffers at lua_close */
  lua_newuserdatauv(L, 0, 0);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, module_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_setfield(L, -2, "_buffers");
  lua_createtable(L, 0, 1);
  lua_pushfstring(L, "%d.%d.%d", HIREDIS_MAJOR, HIREDIS_MINOR, HIREDIS_PATCH);
  lua_setfield(L, -2, "hiredis");
  lua_setfield(L, -2, "_versions");
  return 1;
}
