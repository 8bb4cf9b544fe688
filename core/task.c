/* task.c: the scheduler and the await bridge; the only lua_resume of task
 * coroutines.  A task is a full userdata "rbe.task" whose user values hold
 * its coroutine (1) and, once it failed, its error object (2).  While alive
 * a task is anchored by a registry reference to itself; the waiting C
 * primitive's frame (and so its arguments) stays on the coroutine stack
 * across the yield, which anchors the primitive's own handle.
 *
 * Completions never resume directly: rbe_wait_done/fail enqueue the task on
 * the run queue and the uv_idle callback drains it.  Each task embeds its
 * one wait; a serial number guards against late completions.  Cancellation
 * (task:cancel, rbe.timeout, SIGINT) stops the in-flight request through
 * the primitive's cancel function and resumes the task with an error
 * object, so to-be-closed variables, pcall handlers and undo code run. */
#include "task.h"
#include "aux.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TASK_MT "rbe.task"

enum { W_IDLE, W_PENDING, W_QUEUED };
enum { T_READY, T_RUNNING, T_WAITING, T_DONE, T_FAILED, T_CANCELLED };
enum { INJ_NONE, INJ_CANCEL, INJ_TIMEOUT };

static const char *const state_names[] = {"ready", "running", "waiting",
                                          "done", "failed", "cancelled"};

struct rbe_wait {
  rbe_task *task;
  int state;
  rbe_cancel_fn cancel;
  void *cancel_ud;
  rbe_push_fn push;
  void *push_ud;
  int failed;
  const char *what;
};

typedef struct scope {
  struct scope *prev;
  rbe_task *task;
  uv_timer_t *timer;
  double secs;
  int expired;
  int depth;         /* the task's shield depth when the scope began */
} scope;

typedef struct joinwait joinwait;
typedef struct joinnode {
  joinwait *jw;
  rbe_task *target;
  struct joinnode *prev, *next;
} joinnode;

struct joinwait {
  rbe_task *waiter;
  int n;
  int winner;        /* 1-based index of the target that finished */
  joinnode nodes[];
};

struct rbe_task {
  lua_State *co;
  int self_ref;
  int state;
  int started;
  int queued;            /* on the run queue */
  int cancel_requested;
  int shield;            /* rbe.shield nesting: cancellation held off */
  const char *cancel_reason;  /* static, or anchored as user value 3 */
  int cancel_interrupt;      /* cancelled by Ctrl-C/SIGTERM or as such */
  int inject;            /* error to deliver at the next resume */
  scope *inject_scope;
  int observed;          /* its outcome was read (join, all, ...) */
  int nres;
  long id;
  rbe_wait wait;
  scope *scopes;
  joinnode *joiners;
  rbe_task *next_ready;
  rbe_task *prev_alive, *next_alive;
};

static struct {
  lua_State *L;
  uv_loop_t *loop;
  uv_idle_t idle;
  rbe_task *head, *tail;      /* run queue */
  rbe_task *alive;            /* list of live tasks */
  long nalive;
  long next_id;
  rbe_task *volatile current;
  int exit_code;
} S;

static char sentinel;        /* yielded by every wait */

/* SIGINT/SIGTERM received (main.c's handler counts them) */
volatile sig_atomic_t rbe_nsignals;

static void idle_cb(uv_idle_t *h);

uv_loop_t *rbe_loop(void) { return S.loop; }
rbe_task *rbe_task_current(void) { return S.current; }
int rbe_sched_exit_code(void) { return S.exit_code; }

/* ---- run queue ---- */

static void enqueue(rbe_task *t) {
  if (t->queued) return;
  t->queued = 1;
  t->next_ready = NULL;
  if (S.tail) S.tail->next_ready = t;
  else S.head = t;
  S.tail = t;
  if (!uv_is_active((uv_handle_t *)&S.idle)) uv_idle_start(&S.idle, idle_cb);
}

static void push_task(lua_State *L, rbe_task *t) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->self_ref);
}

/* Push the `cancelled` error object of task t (what: the wait). */
static void push_cancelled(lua_State *L, rbe_task *t, const char *what) {
  const char *why = t->cancel_reason ? t->cancel_reason : "task cancelled";
  if (what) rbe_error_push(L, "cancelled", 0, "%s: %s", what, why);
  else rbe_error_push(L, "cancelled", 0, "%s", why);
  if (t->cancel_interrupt) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "interrupted");
  }
}

/* ---- waits ---- */

static rbe_wait *wait_new(lua_State *L, const char *what, int shielded) {
  rbe_task *t = S.current;
  if (!t)
    luaL_error(L, "%s must run inside a task (run the file with rbe, or "
               "use rbe.spawn)", what);
  if (!lua_isyieldable(L))
    luaL_error(L, "%s cannot wait here: it is called across a C boundary "
               "(a table.sort comparator, gsub callback, metamethod such as "
               "__gc/__tostring, or a non-rbe C function)", what);
  if (t->wait.state != W_IDLE)
    luaL_error(L, "%s: task is already waiting (internal error)", what);
  if (t->cancel_requested && !shielded && !t->shield) {
    push_cancelled(L, t, what);
    lua_error(L);
  }
  for (scope *s = t->scopes; s && !shielded; s = s->prev)
    if (s->expired && s->depth >= t->shield) {
      rbe_error_push(L, "timeout", 1, "%s: timed out after %fs", what,
                     s->secs);
      rbe_error_code_str(L, "ETIMEDOUT");
      lua_error(L);
    }
  t->wait.task = t;
  t->wait.what = what;
  return &t->wait;
}

rbe_wait *rbe_wait_new(lua_State *L, const char *what) {
  return wait_new(L, what, 0);
}

static int wait_k(lua_State *L, int status, lua_KContext ctx) {
  int base = (int)ctx;   /* stack: frame..., ok, values... */
  (void)status;
  if (!lua_toboolean(L, base + 1)) {
    lua_settop(L, base + 2);
    return lua_error(L);
  }
  return lua_gettop(L) - (base + 1);
}

int rbe_wait_yieldk(lua_State *L, rbe_wait *w, rbe_cancel_fn cancel,
                    void *ud, lua_KFunction k) {
  /* past this point nothing raises until the task is resumed */
  w->state = W_PENDING;
  w->cancel = cancel;
  w->cancel_ud = ud;
  w->push = NULL;
  w->push_ud = NULL;
  w->failed = 0;
  rbe_counts[RBE_COUNT_WAITS]++;
  int base = lua_gettop(L);
  lua_pushlightuserdata(L, &sentinel);
  return lua_yieldk(L, 1, (lua_KContext)base, k ? k : wait_k);
}

int rbe_wait_yield(lua_State *L, rbe_wait *w, rbe_cancel_fn cancel,
                   void *ud) {
  return rbe_wait_yieldk(L, w, cancel, ud, NULL);
}

int rbe_wait_values(lua_State *L, lua_KContext ctx) {
  return wait_k(L, LUA_YIELD, ctx);
}

static void wait_complete(rbe_wait *w, rbe_push_fn push, void *ud,
                          int failed) {
  if (w->state != W_PENDING) {
    fprintf(stderr, "rbe: internal error: completion of a wait that is not "
            "pending (%s)\n", w->what ? w->what : "?");
    if (push) push(NULL, ud);
    return;
  }
  w->state = W_QUEUED;
  w->push = push;
  w->push_ud = ud;
  w->failed = failed;
  enqueue(w->task);
}

void rbe_wait_done(rbe_wait *w, rbe_push_fn push, void *ud) {
  wait_complete(w, push, ud, 0);
}

void rbe_wait_fail(rbe_wait *w, rbe_push_fn push, void *ud) {
  wait_complete(w, push, ud, 1);
}

int rbe_push_nothing(lua_State *L, void *ud) {
  (void)L; (void)ud;
  return 0;
}

/* Stop the task's in-flight wait (if any) and make its next resume raise. */
static void interrupt_task(rbe_task *t, int inject, scope *s) {
  rbe_wait *w = &t->wait;
  if (t->state >= T_DONE) return;
  if (w->state == W_PENDING) {
    w->state = W_IDLE;
    rbe_counts[RBE_COUNT_WAITS]--;
    if (w->cancel) w->cancel(w->cancel_ud);
    t->inject = inject;
    t->inject_scope = s;
    enqueue(t);
  } else if (w->state == W_QUEUED && inject == INJ_CANCEL) {
    /* the result arrived but was not delivered yet: drop it */
    t->inject = inject;
  }
  /* a ready or running task sees cancel_requested/expired at its next
   * wait */
}

/* ---- timeouts ---- */

static void scope_close_cb(uv_handle_t *h) {
  free(h);
  rbe_counts[RBE_COUNT_HANDLES]--;
}

static void scope_timer_cb(uv_timer_t *timer) {
  scope *s = timer->data;
  s->expired = 1;
  rbe_task *t = s->task;
  if (t->wait.state == W_PENDING && s->depth >= t->shield)
    interrupt_task(t, INJ_TIMEOUT, s);
}

static void scope_unlink(rbe_task *t, scope *s) {
  for (scope **p = &t->scopes; *p; p = &(*p)->prev)
    if (*p == s) { *p = s->prev; break; }
  if (t->inject_scope == s) t->inject_scope = NULL;
  uv_timer_stop(s->timer);
  uv_close((uv_handle_t *)s->timer, scope_close_cb);
  free(s);
}

static int timeout_k(lua_State *L, int status, lua_KContext ctx) {
  scope *s = (scope *)ctx;
  rbe_task *t = s->task;
  scope_unlink(t, s);
  if (status != LUA_OK && status != LUA_YIELD) return lua_error(L);
  return lua_gettop(L) - 1;  /* stack: duration, results... */
}

/* rbe.timeout(d, fn, ...) -> fn's results  [yields]
 * Runs fn in the current task; when d elapses, fn's in-flight wait is
 * cancelled and a `timeout` error object is raised inside fn.  Every later
 * wait inside fn fails the same way until rbe.timeout returns. */
static int l_timeout(lua_State *L) {
  double secs = rbe_check_duration(L, 1, "rbe.timeout");
  luaL_checkany(L, 2);
  rbe_task *t = S.current;
  if (!t) return luaL_error(L, "rbe.timeout must run inside a task");
  if (!lua_isyieldable(L))
    return luaL_error(L, "rbe.timeout cannot wait here (C boundary)");
  scope *s = calloc(1, sizeof *s);
  uv_timer_t *timer = malloc(sizeof *timer);
  if (!s || !timer) { free(s); free(timer); return luaL_error(L, "out of memory"); }
  uv_timer_init(S.loop, timer);
  rbe_counts[RBE_COUNT_HANDLES]++;
  timer->data = s;
  s->task = t;
  s->timer = timer;
  s->secs = secs;
  s->depth = t->shield;
  s->prev = t->scopes;
  t->scopes = s;
  uv_timer_start(timer, scope_timer_cb, rbe_duration_ms(secs), 0);
  int status = lua_pcallk(L, lua_gettop(L) - 2, LUA_MULTRET, 0,
                          (lua_KContext)s, timeout_k);
  return timeout_k(L, status, (lua_KContext)s);
}

/* ---- shields ---- */

static int shield_k(lua_State *L, int status, lua_KContext ctx) {
  rbe_task *t = (rbe_task *)ctx;
  t->shield--;
  if (status != LUA_OK && status != LUA_YIELD) return lua_error(L);
  return lua_gettop(L);
}

/* rbe.shield(fn, ...) -> fn's results  [yields]
 * Runs fn with cancellation (task:cancel, Ctrl-C, enclosing rbe.timeout)
 * held off, so cleanup and undo code can wait; timeouts created inside fn
 * still apply.  A pending cancellation takes effect after fn returns. */
static int l_shield(lua_State *L) {
  luaL_checkany(L, 1);
  rbe_task *t = S.current;
  if (!t) return luaL_error(L, "rbe.shield must run inside a task");
  t->shield++;
  int status = lua_pcallk(L, lua_gettop(L) - 1, LUA_MULTRET, 0,
                          (lua_KContext)t, shield_k);
  return shield_k(L, status, (lua_KContext)t);
}

/* ---- joining ---- */

static void jw_unlink(joinwait *jw) {
  for (int i = 0; i < jw->n; i++) {
    joinnode *n = &jw->nodes[i];
    if (!n->target) continue;
    if (n->prev) n->prev->next = n->next;
    else n->target->joiners = n->next;
    if (n->next) n->next->prev = n->prev;
    n->target = NULL;
  }
}

static void jw_cancel(void *ud) {
  joinwait *jw = ud;
  jw_unlink(jw);
  free(jw);
}

static int jw_push_index(lua_State *L, void *ud) {
  joinwait *jw = ud;
  int winner = jw->winner;
  free(jw);
  if (!L) return 0;
  lua_pushinteger(L, winner);
  return 1;
}

static void wake_joiners(rbe_task *t) {
  while (t->joiners) {
    joinnode *n = t->joiners;
    joinwait *jw = n->jw;
    jw->winner = (int)(n - jw->nodes) + 1;
    jw_unlink(jw);
    rbe_wait_done(&jw->waiter->wait, jw_push_index, jw);
  }
}

/* Suspend the current task until one of the n tasks at stack index idx
 * (a single task or an array of tasks) finishes.  [yields] */
static int wait_tasks(lua_State *L, rbe_task **targets, int n,
                      const char *what, lua_KFunction k, int shielded) {
  rbe_wait *w = wait_new(L, what, shielded);
  joinwait *jw = malloc(sizeof *jw + (size_t)n * sizeof(joinnode));
  if (!jw) return luaL_error(L, "out of memory");
  jw->waiter = S.current;
  jw->n = n;
  jw->winner = 0;
  for (int i = 0; i < n; i++) {
    joinnode *node = &jw->nodes[i];
    node->jw = jw;
    node->target = targets[i];
    node->prev = NULL;
    node->next = targets[i]->joiners;
    if (node->next) node->next->prev = node;
    targets[i]->joiners = node;
  }
  return rbe_wait_yieldk(L, w, jw_cancel, jw, k);
}

static rbe_task *check_task(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, TASK_MT);
}

/* Push a finished task's results (ok) or raise its error. */
static int task_results(lua_State *L, rbe_task *t) {
  t->observed = 1;
  if (t->state == T_DONE) {
    luaL_checkstack(L, t->nres, "too many results");
    int top = lua_gettop(t->co);
    for (int i = top - t->nres + 1; i <= top; i++) {
      lua_pushvalue(t->co, i);
      lua_xmove(t->co, L, 1);
    }
    return t->nres;
  }
  lua_getiuservalue(L, 1, 2);
  return lua_error(L);
}

static int join_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  rbe_wait_values(L, ctx);          /* raises if the join was cancelled */
  lua_settop(L, 1);
  return task_results(L, check_task(L, 1));
}

/* task:join() -> fn's results, or raises the task's error  [yields] */
static int task_join(lua_State *L) {
  rbe_task *t = check_task(L, 1);
  lua_settop(L, 1);
  if (t == S.current)
    return luaL_error(L, "task:join: a task cannot join itself");
  if (t->state >= T_DONE) return task_results(L, t);
  rbe_task *targets[1] = {t};
  return wait_tasks(L, targets, 1, "task:join", join_k, 0);
}

/* rbe.wait_any(tasks[, shielded]) -> index of the first task in the array
 * to finish (at once if one already has)  [yields]
 * shielded: wait even though this task is already cancelled or timed out
 * (used to let cancelled children unwind before re-raising). */
static int l_wait_any(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  int shielded = lua_toboolean(L, 2);
  lua_settop(L, 1);
  int n = (int)luaL_len(L, 1);
  if (n == 0) return luaL_error(L, "rbe.wait_any: empty list of tasks");
  rbe_task *stack_targets[16];
  rbe_task **targets = n <= 16 ? stack_targets
                               : lua_newuserdatauv(L, n * sizeof *targets, 0);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    rbe_task *t = luaL_testudata(L, -1, TASK_MT);
    if (!t) return luaL_error(L, "rbe.wait_any: item %d is not a task", i);
    lua_pop(L, 1);
    if (t->state >= T_DONE) { lua_pushinteger(L, i); return 1; }
    if (t == S.current)
      return luaL_error(L, "rbe.wait_any: a task cannot wait for itself");
    targets[i - 1] = t;
  }
  /* targets live in the table at index 1, anchored by this frame */
  return wait_tasks(L, targets, n, "rbe.wait_any", NULL, shielded);
}

/* task:cancel([reason]) -> nothing.  A waiting task is woken with a
 * `cancelled` error; a task that has not started never runs. */
static void task_cancel_c(rbe_task *t, const char *reason, int interrupt) {
  if (t->state >= T_DONE || t->cancel_requested) return;
  t->cancel_requested = 1;
  t->cancel_reason = reason;
  t->cancel_interrupt = interrupt;
  if (t->state == T_RUNNING || t->shield) return; /* sees it later */
  if (!t->started) { t->inject = INJ_CANCEL; enqueue(t); return; }
  interrupt_task(t, INJ_CANCEL, NULL);
}

/* task:cancel([reason[, {interrupted = true}]]) -> nothing.  The reason
 * becomes the message of the `cancelled` error; `interrupted` marks it as
 * an operator's interruption (Ctrl-C) rather than a cancellation by the
 * program (err.interrupted = true), as the signal handler does. */
static int task_cancel(lua_State *L) {
  rbe_task *t = check_task(L, 1);
  const char *reason = "task cancelled";
  int interrupt = lua_istable(L, 3) && rbe_opt_bool_field(L, 3, "interrupted", 0);
  if (lua_type(L, 2) == LUA_TSTRING) {
    if (t->state >= T_DONE || t->cancel_requested) return 0;
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, 1, 3);   /* anchors the string */
    reason = lua_tostring(L, 2);
  }
  if (t == S.current) {
    t->cancel_requested = 1;
    t->cancel_reason = lua_type(L, 2) == LUA_TSTRING ? reason : "task cancelled itself";
    t->cancel_interrupt = interrupt;
    push_cancelled(L, t, NULL);
    return lua_error(L);
  }
  task_cancel_c(t, reason, interrupt);
  return 0;
}

/* task:status() -> "ready"|"running"|"waiting"|"done"|"failed"|"cancelled" */
static int task_status(lua_State *L) {
  rbe_task *t = check_task(L, 1);
  int st = t->state;
  if (st == T_READY && t->started) st = T_WAITING;
  lua_pushstring(L, state_names[st]);
  return 1;
}

/* task:done() -> boolean (finished, whatever the outcome) */
static int task_done(lua_State *L) {
  lua_pushboolean(L, check_task(L, 1)->state >= T_DONE);
  return 1;
}

/* task:result() -> like join, but raises if the task is still running */
static int task_result(lua_State *L) {
  rbe_task *t = check_task(L, 1);
  lua_settop(L, 1);
  if (t->state < T_DONE) return luaL_error(L, "task:result: task %d is "
                                           "still %s", (int)t->id,
                                           state_names[t->state]);
  return task_results(L, t);
}

/* task:error() -> the error object of a failed/cancelled task, or nil */
static int task_error(lua_State *L) {
  rbe_task *t = check_task(L, 1);
  if (t->state == T_FAILED || t->state == T_CANCELLED) {
    t->observed = 1;
    lua_getiuservalue(L, 1, 2);
  } else lua_pushnil(L);
  return 1;
}

static int task_index_id(lua_State *L) {
  lua_pushinteger(L, check_task(L, 1)->id);
  return 1;
}

static int task_tostring(lua_State *L) {
  rbe_task *t = check_task(L, 1);
  int st = t->state;
  if (st == T_READY && t->started) st = T_WAITING;
  lua_pushfstring(L, "task %d (%s)", (int)t->id, state_names[st]);
  return 1;
}

static int task_gc(lua_State *L) {
  rbe_task *t = check_task(L, 1);
  if (t->state == T_FAILED && !t->observed) {
    lua_getiuservalue(L, 1, 2);
    const char *msg = luaL_tolstring(L, -1, NULL);
    fprintf(stderr, "rbe: task %ld failed and nobody joined it: %s\n",
            t->id, msg);
    lua_pop(L, 2);
  }
  while (t->scopes) scope_unlink(t, t->scopes);
  return 0;
}

/* ---- running tasks ---- */

static void alive_unlink(rbe_task *t) {
  if (t->prev_alive) t->prev_alive->next_alive = t->next_alive;
  else S.alive = t->next_alive;
  if (t->next_alive) t->next_alive->prev_alive = t->prev_alive;
  t->prev_alive = t->next_alive = NULL;
}

/* Message handler of a task's body: turn what was raised into an error
 * object carrying the traceback of the point where it was raised. */
static int task_msgh(lua_State *L) {
  if (rbe_is_error(L, 1)) {
    lua_getfield(L, 1, "traceback");
    int has = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (!has) {
      luaL_traceback(L, L, NULL, 1);
      lua_setfield(L, 1, "traceback");
    }
  } else if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER ||
             lua_isnil(L, 1)) {
    rbe_error_push(L, "lua", 0, "%s", lua_isnil(L, 1) ? "error (nil)"
                                                      : lua_tostring(L, 1));
    luaL_traceback(L, L, NULL, 1);
    lua_setfield(L, -2, "traceback");
    return 1;
  }
  lua_settop(L, 1);
  return 1;
}

/* The body of every task: true, fn(...) or false, err.  The pcall runs
 * inside the task's coroutine, so to-be-closed variables and handlers run
 * while the task is still current (they may even wait). */
static int task_body_k(lua_State *L, int status, lua_KContext ctx) {
  (void)ctx;
  /* stack: msgh, results... | msgh, err */
  lua_pushboolean(L, status == LUA_OK || status == LUA_YIELD);
  lua_replace(L, 1);
  return lua_gettop(L);
}

static int task_body(lua_State *L) {
  int nargs = lua_gettop(L) - 1;
  lua_pushcfunction(L, task_msgh);
  lua_insert(L, 1);
  int status = lua_pcallk(L, nargs, LUA_MULTRET, 1, 0, task_body_k);
  return task_body_k(L, status, 0);
}

rbe_task *rbe_task_spawn(lua_State *L, int nargs) {
  /* stack: fn, args */
  lua_pushcfunction(L, task_body);
  lua_insert(L, -(nargs + 2));
  nargs++;
  rbe_task *t = lua_newuserdatauv(L, sizeof *t, 3);
  memset(t, 0, sizeof *t);
  t->self_ref = LUA_NOREF;
  luaL_setmetatable(L, TASK_MT);
  t->co = lua_newthread(L);
  lua_setiuservalue(L, -2, 1);
  /* stack: fn, args, task */
  lua_insert(L, -(nargs + 2));
  lua_xmove(L, t->co, nargs + 1);
  /* stack: task */
  t->id = ++S.next_id;
  t->state = T_READY;
  t->wait.task = t;
  lua_pushvalue(L, -1);
  t->self_ref = rbe_ref(L);
  t->next_alive = S.alive;
  if (S.alive) S.alive->prev_alive = t;
  S.alive = t;
  S.nalive++;
  rbe_counts[RBE_COUNT_TASKS]++;
  enqueue(t);
  return t;
}

/* Turn whatever a task raised into an error object with a traceback. */
static void finish_error(lua_State *co, rbe_task *t) {
  lua_State *L = S.L;
  int iserr = rbe_is_error(co, -1);
  if (iserr) {
    lua_getfield(co, -1, "traceback");
    int has = !lua_isnil(co, -1);
    lua_pop(co, 1);
    if (!has) {
      luaL_traceback(co, co, NULL, 0);
      lua_setfield(co, -2, "traceback");
    }
  } else if (lua_type(co, -1) == LUA_TSTRING ||
             lua_type(co, -1) == LUA_TNUMBER || lua_isnil(co, -1)) {
    const char *msg = lua_isnil(co, -1) ? "error (nil)"
                                        : lua_tostring(co, -1);
    rbe_error_push(co, "lua", 0, "%s", msg);
    luaL_traceback(co, co, NULL, 0);
    lua_setfield(co, -2, "traceback");
    lua_remove(co, -2);
  }
  /* stack(co): err -> store it as the task's user value 2 */
  lua_xmove(co, L, 1);
  push_task(L, t);
  lua_insert(L, -2);
  lua_setiuservalue(L, -2, 2);
  lua_pop(L, 1);
  /* an os.exit request ends the process after every task unwinds */
  if (iserr) {
    push_task(L, t);
    lua_getiuservalue(L, -1, 2);
    lua_getfield(L, -1, "kind");
    if (lua_type(L, -1) == LUA_TSTRING &&
        strcmp(lua_tostring(L, -1), "exit") == 0) {
      lua_getfield(L, -2, "code");
      S.exit_code = (int)lua_tointeger(L, -1);
      lua_pop(L, 1);
      t->observed = 1;
      rbe_sched_cancel_all("the process is exiting (os.exit)", 0);
    }
    lua_pop(L, 3);
  }
}

static void finish(rbe_task *t, int status, int nres) {
  if (status == LUA_OK && lua_toboolean(t->co, -nres)) {
    t->nres = nres - 1;
    t->state = T_DONE;
  } else if (status == LUA_OK) {
    finish_error(t->co, t);
    t->state = t->cancel_requested ? T_CANCELLED : T_FAILED;
  } else {
    finish_error(t->co, t);
    t->state = t->cancel_requested ? T_CANCELLED : T_FAILED;
    /* close pending to-be-closed variables (5.4.4: lua_resetthread) */
    lua_resetthread(t->co);
  }
  while (t->scopes) scope_unlink(t, t->scopes);
  wake_joiners(t);
  alive_unlink(t);
  S.nalive--;
  rbe_counts[RBE_COUNT_TASKS]--;
  rbe_unref(S.L, &t->self_ref);
  if (S.nalive == 0) uv_stop(S.loop);
}

static void push_inject(lua_State *co, rbe_task *t) {
  const char *what = t->wait.what ? t->wait.what : "wait";
  lua_pushboolean(co, 0);
  if (t->inject == INJ_TIMEOUT) {
    double secs = t->inject_scope ? t->inject_scope->secs : 0;
    rbe_error_push(co, "timeout", 1, "%s: timed out after %fs", what, secs);
    rbe_error_code_str(co, "ETIMEDOUT");
  } else {
    push_cancelled(co, t, what);
  }
  t->inject = INJ_NONE;
  t->inject_scope = NULL;
}

static void run_task(rbe_task *t) {
  lua_State *co = t->co;
  int nargs;
  rbe_wait *w = &t->wait;
  if (!t->started) {
    t->started = 1;
    if (t->inject) {           /* cancelled before it ran */
      t->inject = INJ_NONE;
      lua_settop(co, 0);
      push_cancelled(co, t, NULL);
      finish(t, LUA_ERRRUN, 1);
      return;
    }
    nargs = lua_gettop(co) - 1;
  } else if (w->state == W_QUEUED) {
    w->state = W_IDLE;
    rbe_counts[RBE_COUNT_WAITS]--;
    if (t->inject) {
      w->push(NULL, w->push_ud);
      push_inject(co, t);
      nargs = 2;
    } else {
      lua_pushboolean(co, !w->failed);
      nargs = 1 + w->push(co, w->push_ud);
    }
  } else if (t->inject) {
    push_inject(co, t);
    nargs = 2;
  } else {
    nargs = 0;                 /* rescheduled after a plain yield */
  }
  int nres = 0;
  S.current = t;
  t->state = T_RUNNING;
  int status = lua_resume(co, S.L, nargs, &nres);
  S.current = NULL;
  if (status == LUA_YIELD) {
    lua_pop(co, nres);
    t->state = T_WAITING;
    if (w->state == W_IDLE) {  /* coroutine.yield() at top level */
      t->state = T_READY;
      enqueue(t);
    }
    return;
  }
  finish(t, status, nres);
}

static void idle_cb(uv_idle_t *h) {
  /* drain what is queued now; tasks enqueued meanwhile run next turn so
   * I/O is polled between batches */
  rbe_task *last = S.tail;
  while (S.head) {
    rbe_task *t = S.head;
    S.head = t->next_ready;
    if (!S.head) S.tail = NULL;
    t->queued = 0;
    t->next_ready = NULL;
    if (t->state < T_DONE) run_task(t);
    if (t == last) break;
  }
  if (!S.head) uv_idle_stop(h);
}

void rbe_sched_cancel_all(const char *why, int interrupt) {
  for (rbe_task *t = S.alive; t; t = t->next_alive)
    task_cancel_c(t, why, interrupt);
}

static void hook_interrupt(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  rbe_error_push(L, "cancelled", 0, "interrupted");
  lua_pushboolean(L, 1);
  lua_setfield(L, -2, "interrupted");
  lua_error(L);
}

void rbe_sched_interrupt_running(void) {
  rbe_task *t = S.current;
  if (t)
    lua_sethook(t->co, hook_interrupt,
                LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

int rbe_sched_run(void) {
  for (;;) {
    uv_run(S.loop, UV_RUN_DEFAULT);
    if (S.nalive == 0) return 0;
    if (S.head) continue;   /* uv_stop raced with new work */
    /* nothing in flight can ever wake the waiting tasks */
    fprintf(stderr, "rbe: deadlock: %ld task(s) waiting with nothing in "
            "flight; cancelling them\n", S.nalive);
    long before = S.nalive;
    rbe_sched_cancel_all("deadlock: nothing could wake this task", 0);
    uv_run(S.loop, UV_RUN_DEFAULT);
    if (S.nalive == before) return (int)S.nalive;
  }
}

int rbe_task_outcome(lua_State *L, int idx, rbe_task *t) {
  if (t->state == T_DONE) return 0;
  if (L && (t->state == T_FAILED || t->state == T_CANCELLED))
    lua_getiuservalue(L, idx, 2);
  t->observed = 1;
  return t->state == T_CANCELLED ? 2 : 1;
}

/* rbe.spawn(fn, ...) -> task.  The task starts at the next loop turn. */
static int l_spawn(lua_State *L) {
  luaL_checkany(L, 1);
  if (!lua_isfunction(L, 1)) {
    if (luaL_getmetafield(L, 1, "__call") == LUA_TNIL)
      return luaL_error(L, "rbe.spawn: function expected, got %s",
                        luaL_typename(L, 1));
    lua_pop(L, 1);
  }
  rbe_task_spawn(L, lua_gettop(L) - 1);
  return 1;
}

/* rbe.current() -> the running task, or nil */
static int l_current(lua_State *L) {
  if (!S.current) lua_pushnil(L);
  else push_task(L, S.current);
  return 1;
}

/* rbe.sentinel: what waits yield; coroutine.resume uses it to pass waits
 * through user coroutines */
static int l_cancel_current_wait(lua_State *L) {
  rbe_task *t = S.current;
  if (t && t->wait.state == W_PENDING) {
    rbe_wait *w = &t->wait;
    w->state = W_IDLE;
    rbe_counts[RBE_COUNT_WAITS]--;
    if (w->cancel) w->cancel(w->cancel_ud);
  }
  (void)L;
  return 0;
}

/* rbe.interrupted() -> true once SIGINT or SIGTERM arrived */
static int l_interrupted(lua_State *L) {
  lua_pushboolean(L, rbe_nsignals > 0);
  return 1;
}

/* os.exit(code) inside a task: unwind every task, then exit */
static int l_exit(lua_State *L) {
  int code;
  if (lua_isboolean(L, 1)) code = lua_toboolean(L, 1) ? 0 : 1;
  else code = (int)luaL_optinteger(L, 1, 0);
  if (!S.current) {
    fflush(NULL);
    exit(code);
  }
  rbe_error_push(L, "exit", 0, "os.exit(%d)", code);
  rbe_error_code_int(L, code);
  return lua_error(L);
}

static const luaL_Reg task_methods[] = {
  {"join", task_join},
  {"cancel", task_cancel},
  {"status", task_status},
  {"done", task_done},
  {"result", task_result},
  {"error", task_error},
  {"id", task_index_id},
  {NULL, NULL}
};

static const luaL_Reg core_funcs[] = {
  {"spawn", l_spawn},
  {"timeout", l_timeout},
  {"shield", l_shield},
  {"wait_any", l_wait_any},
  {"current", l_current},
  {"_cancel_current_wait", l_cancel_current_wait},
  {"_exit", l_exit},
  {"interrupted", l_interrupted},
  {NULL, NULL}
};

static void idle_close_cb(uv_handle_t *h) { (void)h; }

void rbe_sched_init(lua_State *L, uv_loop_t *loop) {
  memset(&S, 0, sizeof S);
  S.L = L;
  S.loop = loop;
  S.exit_code = -1;
  uv_idle_init(loop, &S.idle);
}

void rbe_sched_close(void) {
  uv_close((uv_handle_t *)&S.idle, idle_close_cb);
}

int luaopen_rbe_core(lua_State *L) {
  if (luaL_newmetatable(L, TASK_MT)) {
    luaL_newlib(L, task_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, task_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, task_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushliteral(L, TASK_MT);
    lua_setfield(L, -2, "__name");
  }
  lua_pop(L, 1);
  luaL_newlib(L, core_funcs);
  lua_pushlightuserdata(L, &sentinel);
  lua_setfield(L, -2, "_sentinel");
  return 1;
}
