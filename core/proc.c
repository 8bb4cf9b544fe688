/* proc.c: child processes (module "rbe.proc.core", wrapped by
 * lua/rbe/proc.lua).  Children are started with clone(CLONE_VM |
 * CLONE_VFORK)+execve() (see start_child) so the
 * child can put itself in its own process group and ask to die with rbe
 * (PR_SET_PDEATHSIG), which uv_spawn cannot do.  Everything that can fail
 * (argv, environment, PATH lookup) is prepared in the parent before the
 * fork; the child only makes async-signal-safe calls and reports a failed
 * chdir/exec through a close-on-exec pipe.
 *
 * Ownership: a `child` is malloc'd and owned by C.  It is freed only when
 * (1) it was reaped, (2) every uv handle embedded in it got its close
 * callback, (3) no Lua wait on it is pending and (4) no "rbe.proc.child"
 * userdata points at it.  So a run whose task was cancelled, or a spawned
 * child whose handle was collected, lives on here until the group is dead
 * and its pipes are closed, without touching the (gone) wait again.  One
 * uv_signal_t on SIGCHLD reaps our children with waitpid(pid, WNOHANG),
 * never waitpid(-1); it is referenced only while children are alive. */
#include "aux.h"
#include "task.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHILD_MT "rbe.proc.child"
#define RUN_MAX_OUTPUT ((lua_Integer)64 * 1024 * 1024)
#define SPAWN_MAX_OUTPUT ((lua_Integer)1024 * 1024)
#define KILL_GRACE 5.0
#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin"
#define DESC_MAX 400
#define TAIL_LINES 5
#define TAIL_BYTES 1500

extern char **environ;

enum { S_OUT, S_ERR };                       /* captured streams */
enum { SLOT_WAIT, SLOT_OUT, SLOT_ERR, SLOT_WRITE, NSLOTS };
enum { IN_NULL, IN_DATA, IN_PIPE };
enum { IO_PIPE, IO_NULL, IO_INHERIT, IO_STDOUT };
enum { ST_CHDIR = 1, ST_DUP, ST_EXEC };      /* where a child failed */
enum { OUT_OK, OUT_TIMEOUT, OUT_EXIT, OUT_OVERFLOW };

typedef struct child child;

/* Captured output: bytes [start, len) of data are unread.  At most `max`
 * unread bytes are kept; the rest is drained and counted in `dropped`. */
typedef struct {
  char *data;
  size_t start, len, cap, max, dropped;
} obuf;

/* A Lua wait parked on a child (spawned children: wait, lines, write). */
typedef struct {
  child *c;
  rbe_wait *w;       /* parked wait, NULL when none */
  int err;           /* write slot: libuv error to report */
} slot;

struct child {
  child *volatile next;        /* S.head list, read by the signal handler */
  child *prev;
  volatile pid_t pid;
  volatile int reaped;
  int status, status_unknown;
  int spawned;                 /* proc.spawn (else proc.run) */
  int check;
  int completed;               /* reaped and both streams at EOF */
  int out_open, err_open, in_open;
  int in_mode;
  int timer_open, terminating, forced, timed_out;
  unsigned long long sent;     /* signals we sent (bit per signal) */
  int handles;                 /* uv handles whose close_cb is pending */
  int pending;                 /* Lua waits yielded, not pushed/cancelled */
  int owned;                   /* an "rbe.proc.child" userdata points here */
  double timeout, grace;
  uint64_t t0, t1;
  uv_pipe_t pout, perr, pin;
  uv_timer_t timer;
  uv_write_t in_req;
  char *in_data;
  size_t in_len;
  obuf buf[2];
  rbe_wait *run_w;             /* proc.run's wait */
  slot slots[NSLOTS];
  const char *what;            /* "proc.run", "proc.sh", "proc.spawn" */
  char desc[DESC_MAX];         /* the command, secrets as *** */
};

typedef struct {
  child *c;
  int closed;
} child_ud;

typedef struct {
  uv_write_t req;
  child *c;
  char data[];
} write_req;

static struct {
  child *volatile head;
  int inited;
  int devnull;
  uv_signal_t sigchld;
  long live;                   /* forked, not yet reaped */
  long nchildren;              /* child structs not yet freed */
} S = {NULL, 0, -1, {0}, 0, 0};

static char scratch[64 * 1024];   /* every read lands here first */

static void check_done(child *c);

/* ---- signals ---- */

static const char *sig_name(int sig, char *tmp, size_t n) {
  const char *a = sigabbrev_np(sig);
  if (a) snprintf(tmp, n, "SIG%s", a);
  else snprintf(tmp, n, "SIG%d", sig);
  return tmp;
}

/* "SIGTERM", "TERM", "term" or a number -> signal number, or -1 */
static int sig_parse(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TNUMBER) {
    lua_Integer n = lua_tointeger(L, idx);
    return n >= 0 && n < NSIG ? (int)n : -1;
  }
  const char *s = lua_tostring(L, idx);
  if (!s) return -1;
  if (strncasecmp(s, "SIG", 3) == 0) s += 3;
  for (int i = 1; i < NSIG; i++) {
    const char *a = sigabbrev_np(i);
    if (a && strcasecmp(a, s) == 0) return i;
  }
  return -1;
}

/* Signal the child's whole group.  Once the leader is reaped and its pipes
 * are closed the group may be gone and the id reused: leave it alone. */
static void signal_group(child *c, int sig) {
  if (c->reaped && !c->out_open && !c->err_open) return;
  if (sig > 0 && sig < 64) c->sent |= 1ULL << sig;
  if (kill(-c->pid, sig) < 0 && errno == ESRCH && !c->reaped)
    kill(c->pid, sig);
}

/* Called from the SIGINT handler: only kill(2) and plain loads.  The list
 * is only changed on this thread, with signal fences around it. */
void rbe_proc_kill_all(int sig) {
  for (child *c = S.head; c; c = c->next)
    if (!c->reaped && c->pid > 0) kill(-c->pid, sig);
}

static void kill_all_at_exit(void) { rbe_proc_kill_all(SIGKILL); }

/* ---- life cycle ---- */

static void maybe_free(child *c) {
  if (c->handles || c->pending || c->owned || !c->reaped) return;
  if (c->prev) c->prev->next = c->next;
  else S.head = c->next;
  if (c->next) c->next->prev = c->prev;
  atomic_signal_fence(memory_order_seq_cst);
  free(c->buf[0].data);
  free(c->buf[1].data);
  free(c->in_data);
  free(c);
  S.nchildren--;
}

static void handle_close_cb(uv_handle_t *h) {
  child *c = h->data;
  rbe_counts[RBE_COUNT_HANDLES]--;
  c->handles--;
  maybe_free(c);
}

static void close_handle(child *c, uv_handle_t *h) {
  uv_close(h, handle_close_cb);
  (void)c;
}

static void close_stream(child *c, int i) {
  int *open = i == S_OUT ? &c->out_open : &c->err_open;
  if (!*open) return;
  *open = 0;
  close_handle(c, (uv_handle_t *)(i == S_OUT ? &c->pout : &c->perr));
}

static void close_stdin(child *c) {
  if (!c->in_open) return;
  c->in_open = 0;
  close_handle(c, (uv_handle_t *)&c->pin);
}

static int slot_push(lua_State *L, void *ud) {
  slot *s = ud;
  child *c = s->c;
  int err = s->err, n = 0;
  s->err = 0;
  c->pending--;
  if (L && err) {
    rbe_error_push_uv(L, "proc", err, "child:write: `%s`", c->desc);
    n = 1;
  }
  maybe_free(c);
  return n;
}

static void slot_cancel(void *ud) {
  slot *s = ud;
  child *c = s->c;
  s->w = NULL;
  s->err = 0;
  c->pending--;
  maybe_free(c);
}

/* Resume the task parked on slot k, if any; its continuation re-checks. */
static void wake(child *c, int k) {
  slot *s = &c->slots[k];
  if (!s->w) return;
  rbe_wait *w = s->w;
  s->w = NULL;
  if (s->err) rbe_wait_fail(w, slot_push, s);
  else rbe_wait_done(w, slot_push, s);
}

/* ---- output buffers ---- */

static void obuf_add(obuf *b, const char *p, size_t n) {
  size_t stored = b->len - b->start;
  size_t room = stored < b->max ? b->max - stored : 0;
  size_t take = n < room ? n : room;
  b->dropped += n - take;
  if (!take) return;
  if (b->start && (b->start >= b->len / 2 || b->cap - b->len < take)) {
    memmove(b->data, b->data + b->start, stored);
    b->len = stored;
    b->start = 0;
  }
  if (b->cap - b->len < take) {
    size_t cap = b->cap ? b->cap * 2 : 4096;
    while (cap - b->len < take) cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) { b->dropped += take; return; }
    b->data = d;
    b->cap = cap;
  }
  memcpy(b->data + b->len, p, take);
  b->len += take;
}

static void alloc_cb(uv_handle_t *h, size_t size, uv_buf_t *buf) {
  (void)h; (void)size;
  buf->base = scratch;
  buf->len = sizeof scratch;
}

static void read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  child *c = s->data;
  int i = s == (uv_stream_t *)&c->perr ? S_ERR : S_OUT;
  if (n > 0) {
    obuf_add(&c->buf[i], buf->base, (size_t)n);
    wake(c, SLOT_OUT + i);
    return;
  }
  if (n == 0) return;
  /* EOF or a read error: either way this stream is over */
  close_stream(c, i);
  wake(c, SLOT_OUT + i);
  check_done(c);
}

/* ---- termination ---- */

/* After SIGKILL, a reaped leader whose pipes are still held open (by a
 * grandchild that left the group) must not keep the run alive. */
static void force_kill(child *c) {
  c->forced = 1;
  signal_group(c, SIGKILL);
  if (c->reaped) {
    close_stream(c, S_OUT);
    close_stream(c, S_ERR);
    check_done(c);
  }
}

static void timer_cb(uv_timer_t *t) {
  child *c = t->data;
  if (!c->terminating) {
    c->timed_out = 1;
    c->terminating = 1;
    signal_group(c, SIGTERM);
    if (c->grace > 0) uv_timer_start(t, timer_cb, rbe_duration_ms(c->grace), 0);
    else force_kill(c);
  } else {
    force_kill(c);
  }
}

static void ensure_timer(child *c) {
  if (c->timer_open) return;
  uv_timer_init(rbe_loop(), &c->timer);
  c->timer.data = c;
  c->timer_open = 1;
  c->handles++;
  rbe_counts[RBE_COUNT_HANDLES]++;
}

/* SIGTERM to the group now, SIGKILL after kill_grace if still there. */
static void child_terminate(child *c) {
  if (c->completed || c->terminating) return;
  c->terminating = 1;
  signal_group(c, SIGTERM);
  if (c->grace <= 0) { force_kill(c); return; }
  ensure_timer(c);
  uv_timer_start(&c->timer, timer_cb, rbe_duration_ms(c->grace), 0);
}

/* ---- outcome ---- */

static int exit_code(child *c) {
  if (c->status_unknown) return -1;
  if (WIFEXITED(c->status)) return WEXITSTATUS(c->status);
  if (WIFSIGNALED(c->status)) return 128 + WTERMSIG(c->status);
  return -1;
}

static int term_sig(child *c) {
  return !c->status_unknown && WIFSIGNALED(c->status) ? WTERMSIG(c->status)
                                                     : 0;
}

static int outcome(child *c) {
  if (c->timed_out) return OUT_TIMEOUT;
  if (!c->check) return OUT_OK;
  int sig = term_sig(c);
  /* a spawned child that died of a signal we sent it was not a failure */
  int ours = c->spawned && sig > 0 && sig < 64 && (c->sent >> sig & 1);
  if (exit_code(c) != 0 && !ours) return OUT_EXIT;
  if (!c->spawned && (c->buf[0].dropped || c->buf[1].dropped))
    return OUT_OVERFLOW;
  return OUT_OK;
}

static void push_buf(lua_State *L, obuf *b) {
  lua_pushlstring(L, b->data ? b->data + b->start : "", b->len - b->start);
}

/* Set the result fields on the table on top of the stack. */
static void set_fields(lua_State *L, child *c) {
  char tmp[32];
  int sig = term_sig(c);
  lua_pushinteger(L, exit_code(c));
  lua_setfield(L, -2, "code");
  if (sig) {
    lua_pushstring(L, sig_name(sig, tmp, sizeof tmp));
    lua_setfield(L, -2, "signal");
  }
  push_buf(L, &c->buf[S_OUT]);
  lua_setfield(L, -2, "stdout");
  push_buf(L, &c->buf[S_ERR]);
  lua_setfield(L, -2, "stderr");
  lua_pushinteger(L, c->pid);
  lua_setfield(L, -2, "pid");
  uint64_t t1 = c->completed ? c->t1 : uv_hrtime();
  lua_pushnumber(L, (double)(t1 - c->t0) / 1e9);
  lua_setfield(L, -2, "elapsed");
  lua_pushboolean(L, c->buf[0].dropped || c->buf[1].dropped);
  lua_setfield(L, -2, "truncated");
}

/* Push the last lines of stderr (at most TAIL_LINES/TAIL_BYTES), each on
 * its own indented line, or "" when stderr is empty. */
static void push_tail(lua_State *L, child *c) {
  obuf *b = &c->buf[S_ERR];
  const char *s = b->data ? b->data + b->start : "";
  size_t n = b->len - b->start;
  while (n && (s[n - 1] == '\n' || s[n - 1] == '\r')) n--;
  size_t from = n;
  for (int lines = 0; from > 0 && n - from < TAIL_BYTES; ) {
    if (s[from - 1] == '\n' && ++lines == TAIL_LINES) break;
    from--;
  }
  if (n - from > TAIL_BYTES) from = n - TAIL_BYTES;
  luaL_Buffer lb;
  luaL_buffinit(L, &lb);
  if (n) luaL_addstring(&lb, "\n  ");
  for (size_t i = from; i < n; i++) {
    if (s[i] == '\n') luaL_addstring(&lb, "\n  ");
    else if (s[i] != '\r') luaL_addchar(&lb, s[i]);
  }
  luaL_pushresult(&lb);
}

/* Push the outcome: the result table, or an error object (returns 1). */
static int push_outcome(lua_State *L, child *c) {
  char tmp[32];
  int o = outcome(c);
  if (o == OUT_OK) {
    lua_createtable(L, 0, 8);
    set_fields(L, c);
    return 0;
  }
  push_tail(L, c);
  const char *tail = lua_tostring(L, -1);
  int sig = term_sig(c);
  if (o == OUT_TIMEOUT)
    rbe_error_push(L, "timeout", 1, "%s: `%s` timed out after %fs "
                   "(process group killed)%s", c->what, c->desc, c->timeout,
                   tail);
  else if (o == OUT_EXIT && sig)
    rbe_error_push(L, "proc", 0, "%s: `%s` was killed by %s%s", c->what,
                   c->desc, sig_name(sig, tmp, sizeof tmp), tail);
  else if (o == OUT_EXIT)
    rbe_error_push(L, "proc", 0, "%s: `%s` exited with code %d%s", c->what,
                   c->desc, exit_code(c), tail);
  else
    rbe_error_push(L, "proc", 0, "%s: `%s`: output exceeded max_output "
                   "(%I bytes on %s)", c->what, c->desc,
                   (lua_Integer)c->buf[0].max,
                   c->buf[0].dropped ? "stdout" : "stderr");
  lua_remove(L, -2);
  set_fields(L, c);
  /* `code` is the exit code, or ETIMEDOUT/EMSGSIZE for those failures */
  if (o == OUT_TIMEOUT) rbe_error_code_str(L, "ETIMEDOUT");
  else if (o == OUT_OVERFLOW) rbe_error_code_str(L, "EMSGSIZE");
  lua_pushinteger(L, exit_code(c));
  lua_setfield(L, -2, "exit_code");
  lua_pushstring(L, c->desc);
  lua_setfield(L, -2, "command");
  return 1;
}

static int run_push(lua_State *L, void *ud) {
  child *c = ud;
  if (L) push_outcome(L, c);
  c->pending--;
  maybe_free(c);
  return L ? 1 : 0;
}

static void run_cancel(void *ud) {
  child *c = ud;
  c->run_w = NULL;
  c->pending--;
  child_terminate(c);
  maybe_free(c);
}

static void check_done(child *c) {
  if (c->completed || !c->reaped || c->out_open || c->err_open) return;
  c->completed = 1;
  c->t1 = uv_hrtime();
  if (c->timer_open) {
    c->timer_open = 0;
    uv_timer_stop(&c->timer);
    close_handle(c, (uv_handle_t *)&c->timer);
  }
  close_stdin(c);
  if (c->run_w) {
    rbe_wait *w = c->run_w;
    c->run_w = NULL;
    if (outcome(c) != OUT_OK) rbe_wait_fail(w, run_push, c);
    else rbe_wait_done(w, run_push, c);
  }
  wake(c, SLOT_WAIT);
  wake(c, SLOT_OUT);
  wake(c, SLOT_ERR);
}

/* ---- reaping ---- */

static void try_reap(child *c) {
  int st = 0;
  pid_t r;
  do r = waitpid(c->pid, &st, WNOHANG);
  while (r < 0 && errno == EINTR);
  if (r == 0) return;
  if (r < 0) c->status_unknown = 1;   /* ECHILD: reaped by someone else */
  c->status = st;
  c->reaped = 1;
  if (--S.live == 0) uv_unref((uv_handle_t *)&S.sigchld);
  if (c->forced) {
    close_stream(c, S_OUT);
    close_stream(c, S_ERR);
  }
  check_done(c);
  maybe_free(c);
}

static void sigchld_cb(uv_signal_t *h, int sig) {
  (void)h; (void)sig;
  child *c = S.head;
  while (c) {
    child *next = c->next;   /* try_reap may free c, never another */
    if (!c->reaped) try_reap(c);
    c = next;
  }
}

/* ---- starting a child ---- */

typedef struct {
  const char *path;
  char **argv, **envp;
  const char *cwd;
  int in_mode, out_mode, err_mode;
  lua_Integer max_output;
  const char *in_data;
  size_t in_len;
  double timeout, grace;
  int check;
} plan;

typedef struct { int stage, err; } exec_report;

/* Runs in the forked child: async-signal-safe calls only. */
static void child_exec(const plan *p, pid_t ppid, int fin, int fout,
                       int ferr, int report) {
  exec_report r = {0, 0};
  struct sigaction sa;
  sigset_t none;
  setpgid(0, 0);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  /* exits of the child use the raw syscall: it runs on its own stack, and
   * sanitizers' handling of noreturn calls would warn about that */
  if (getppid() != ppid) syscall(SYS_exit_group, 127);  /* rbe died first */
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = SIG_DFL;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGPIPE, &sa, NULL);
  sigaction(SIGCHLD, &sa, NULL);
  sigemptyset(&none);
  /* every source fd is >= 3, so no dup2 clobbers another */
  if ((fin >= 0 && dup2(fin, 0) < 0) || (fout >= 0 && dup2(fout, 1) < 0) ||
      (ferr >= 0 && dup2(ferr, 2) < 0) ||
      (p->err_mode == IO_STDOUT && dup2(1, 2) < 0)) {
    r.stage = ST_DUP;
    goto fail;
  }
  /* fds rbe opened without O_CLOEXEC (Lua's io.open) stay out of the child */
  close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
  if (p->cwd && chdir(p->cwd) < 0) {
    r.stage = ST_CHDIR;
    goto fail;
  }
  sigprocmask(SIG_SETMASK, &none, NULL);
  execve(p->path, p->argv, p->envp);
  r.stage = ST_EXEC;
fail:
  r.err = errno;
  while (write(report, &r, sizeof r) < 0 && errno == EINTR) {}
  syscall(SYS_exit_group, 127);
  return;
}

/* The child starts with clone(CLONE_VM | CLONE_VFORK) on this stack, as
 * posix_spawn does: no page tables are copied, so a spawn costs about a
 * third less than fork() here (see bench/spawn.lua).  The parent is
 * suspended until the child execs or exits, so one static stack serves
 * every spawn; the child only makes syscalls and writes its own stack. */
typedef struct {
  const plan *p;
  pid_t ppid;
  int fin, fout, ferr, report;
} clone_args;

static char child_stack[64 * 1024] __attribute__((aligned(64)));

static int child_entry(void *arg) {
  clone_args *a = arg;
  child_exec(a->p, a->ppid, a->fin, a->fout, a->ferr, a->report);
  return 127;
}

/* Move a descriptor above 2 so the child's dup2 calls cannot collide. */
static int fd_high(int fd) {
  if (fd < 0 || fd > 2) return fd;
  int n = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  close(fd);
  return n;
}

static int make_pipe(int p[2]) {
  if (pipe2(p, O_CLOEXEC) < 0) return -errno;
  p[0] = fd_high(p[0]);
  p[1] = fd_high(p[1]);
  if (p[0] < 0 || p[1] < 0) return -EMFILE;
  return 0;
}

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

static void open_stream(child *c, uv_pipe_t *p, int fd, int *open) {
  uv_pipe_init(rbe_loop(), p, 0);
  p->data = c;
  c->handles++;
  rbe_counts[RBE_COUNT_HANDLES]++;
  *open = 1;
  /* a fresh pipe end cannot really fail here; if it did, the stream is
   * treated as closed so the child is still reaped and freed */
  if (uv_pipe_open(p, fd) < 0) {
    close(fd);
    *open = 0;
    close_handle(c, (uv_handle_t *)p);
  }
}

static void stdin_write_cb(uv_write_t *req, int status) {
  (void)status;   /* EPIPE: the child did not read it all; that is fine */
  close_stdin(req->data);
}

/* Fork and exec.  On failure returns -errno with *stage set, everything
 * closed and reaped; c is then still the caller's to free. */
static int start_child(child *c, const plan *p, int *stage) {
  int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
  int rep[2] = {-1, -1};
  int e = 0;
  *stage = 0;
  if (!S.inited || S.devnull < 0) return -EBADF;
  if ((p->in_mode != IN_NULL && (e = make_pipe(in))) ||
      (p->out_mode == IO_PIPE && (e = make_pipe(out))) ||
      (p->err_mode == IO_PIPE && (e = make_pipe(err))) ||
      (e = make_pipe(rep)))
    goto fail;

  int fin = p->in_mode == IN_NULL ? S.devnull : in[0];
  int fout = p->out_mode == IO_PIPE ? out[1]
           : p->out_mode == IO_NULL ? S.devnull : -1;
  int ferr = p->err_mode == IO_PIPE ? err[1]
           : p->err_mode == IO_NULL ? S.devnull : -1;
  pid_t ppid = getpid();
  sigset_t all, old;
  sigfillset(&all);
  /* no rbe signal handler may run in the child before it resets them */
  pthread_sigmask(SIG_SETMASK, &all, &old);
  c->t0 = uv_hrtime();
  clone_args ca = {p, ppid, fin, fout, ferr, rep[1]};
  pid_t pid = clone(child_entry, child_stack + sizeof child_stack,
                    CLONE_VM | CLONE_VFORK | SIGCHLD, &ca);
  if (pid < 0) {
    e = -errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    goto fail;
  }
  c->pid = pid;
  c->next = S.head;
  if (S.head) S.head->prev = c;
  atomic_signal_fence(memory_order_seq_cst);
  S.head = c;
  S.nchildren++;
  pthread_sigmask(SIG_SETMASK, &old, NULL);

  close_fd(&in[0]);
  close_fd(&out[1]);
  close_fd(&err[1]);
  close_fd(&rep[1]);
  /* EOF: exec succeeded (the pipe is close-on-exec); else why it failed */
  exec_report r;
  ssize_t n;
  do n = read(rep[0], &r, sizeof r);
  while (n < 0 && errno == EINTR);
  close_fd(&rep[0]);
  if (n == (ssize_t)sizeof r) {
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    c->reaped = 1;
    *stage = r.stage;
    e = -r.err;
    goto fail;
  }

  if (S.live++ == 0) uv_ref((uv_handle_t *)&S.sigchld);
  if (p->out_mode == IO_PIPE) {
    open_stream(c, &c->pout, out[0], &c->out_open);
    if (c->out_open) uv_read_start((uv_stream_t *)&c->pout, alloc_cb, read_cb);
  }
  if (p->err_mode == IO_PIPE) {
    open_stream(c, &c->perr, err[0], &c->err_open);
    if (c->err_open) uv_read_start((uv_stream_t *)&c->perr, alloc_cb, read_cb);
  }
  if (p->in_mode != IN_NULL) {
    open_stream(c, &c->pin, in[1], &c->in_open);
    if (c->in_open && p->in_mode == IN_DATA) {
      uv_buf_t b = uv_buf_init(c->in_data, (unsigned)c->in_len);
      c->in_req.data = c;
      if (uv_write(&c->in_req, (uv_stream_t *)&c->pin, &b, 1,
                   stdin_write_cb) < 0)
        close_stdin(c);
    }
  }
  if (p->timeout > 0) {
    ensure_timer(c);
    uv_timer_start(&c->timer, timer_cb, rbe_duration_ms(p->timeout), 0);
  }
  return 0;

fail:
  close_fd(&in[0]); close_fd(&in[1]);
  close_fd(&out[0]); close_fd(&out[1]);
  close_fd(&err[0]); close_fd(&err[1]);
  close_fd(&rep[0]); close_fd(&rep[1]);
  return e;
}

/* ---- argument parsing (everything here may raise) ---- */

static int safe_char(int ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
         (ch >= '0' && ch <= '9') || strchr("_@%+=:,./-", ch);
}

/* Append s to the description, shell-quoted when needed. */
static void desc_add(char *d, const char *s, size_t len, int quote) {
  size_t n = strlen(d);
  int q = 0;
  if (quote) {
    q = len == 0;
    for (size_t i = 0; i < len && !q; i++) q = !safe_char((unsigned char)s[i]);
  }
  char tmp[DESC_MAX];
  size_t k = 0;
  if (q) tmp[k++] = '\'';
  for (size_t i = 0; i < len && k < sizeof tmp - 6; i++) {
    if (q && s[i] == '\'') { memcpy(tmp + k, "'\\''", 4); k += 4; }
    else tmp[k++] = s[i];
  }
  if (q) tmp[k++] = '\'';
  if (n + k + 2 >= DESC_MAX) {
    if (n + 4 < DESC_MAX) strcpy(d + n, "...");
    return;
  }
  if (n) d[n++] = ' ';
  memcpy(d + n, tmp, k);
  d[n + k] = 0;
}

static const char *check_string_value(lua_State *L, int idx, size_t *len,
                                      const char *fname, const char *what) {
  int t = lua_type(L, idx);
  if (t != LUA_TSTRING && t != LUA_TNUMBER)
    luaL_error(L, "%s: %s must be a string, got %s", fname, what,
               luaL_typename(L, idx));
  return lua_tolstring(L, idx, len);
}

static int io_mode(lua_State *L, int opts, const char *name, int allow_stdout,
                   const char *fname) {
  const char *s = rbe_opt_string_field(L, opts, name, "pipe", NULL);
  if (strcmp(s, "pipe") == 0) return IO_PIPE;
  if (strcmp(s, "null") == 0) return IO_NULL;
  if (strcmp(s, "inherit") == 0) return IO_INHERIT;
  if (allow_stdout && strcmp(s, "stdout") == 0) return IO_STDOUT;
  return luaL_error(L, "%s: option '%s' must be \"pipe\", \"null\", "
                    "\"inherit\"%s, got '%s'", fname, name,
                    allow_stdout ? " or \"stdout\"" : "", s);
}

/* Find file in the directories of pathv; 0 and path filled, or -errno. */
static int resolve(const char *file, const char *pathv, char *out,
                   size_t outsz) {
  if (strchr(file, '/')) {
    if (strlen(file) >= outsz) return -ENAMETOOLONG;
    strcpy(out, file);
    return 0;
  }
  if (!*file) return -ENOENT;
  int e = -ENOENT;
  const char *p = pathv && *pathv ? pathv : DEFAULT_PATH;
  size_t flen = strlen(file);
  for (;;) {
    const char *end = strchr(p, ':');
    size_t dlen = end ? (size_t)(end - p) : strlen(p);
    if (dlen + flen + 2 <= outsz) {
      if (dlen) { memcpy(out, p, dlen); out[dlen] = '/'; dlen++; }
      memcpy(out + dlen, file, flen + 1);
      if (access(out, X_OK) == 0) return 0;
      if (errno == EACCES) e = -EACCES;
    }
    if (!end) break;
    p = end + 1;
  }
  return e;
}

/* Build envp from the environment and opts.env (at index envi, 0 if none);
 * the strings are anchored in the holder table at hidx.  Returns the PATH
 * to search in *pathv. */
static char **build_env(lua_State *L, int envi, int clear, int hidx,
                        const char **pathv, const char *fname) {
  int n = 0, k = 0;
  *pathv = clear ? NULL : getenv("PATH");
  if (envi) {
    lua_pushnil(L);
    while (lua_next(L, envi)) {
      n++;
      if (lua_type(L, -2) != LUA_TSTRING)
        luaL_error(L, "%s: env keys must be strings", fname);
      const char *key = lua_tostring(L, -2);
      if (!*key || strchr(key, '='))
        luaL_error(L, "%s: bad environment variable name '%s'", fname, key);
      lua_pop(L, 1);
    }
  }
  int total = n + 1;
  if (!clear) for (char **e = environ; *e; e++) total++;
  char **envp = lua_newuserdatauv(L, sizeof(char *) * (size_t)total, 0);
  int ui = lua_gettop(L);
  if (!clear) {
    for (char **e = environ; *e; e++) {
      const char *eq = strchr(*e, '=');
      if (envi && eq) {
        lua_pushlstring(L, *e, (size_t)(eq - *e));
        int overridden = lua_rawget(L, envi) != LUA_TNIL;
        lua_pop(L, 1);
        if (overridden) continue;
      }
      envp[k++] = *e;
    }
  }
  if (envi) {
    int hn = (int)lua_rawlen(L, hidx);
    lua_pushnil(L);
    while (lua_next(L, envi)) {
      const char *key = lua_tostring(L, -2);
      if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
        if (strcmp(key, "PATH") == 0) *pathv = NULL;
        lua_pop(L, 1);
        continue;   /* false: leave the variable out */
      }
      rbe_push_revealed(L, -1);
      if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
        luaL_error(L, "%s: env value of %s must be a string, number or "
                   "false", fname, key);
      const char *v = lua_tostring(L, -1);
      lua_pushfstring(L, "%s=%s", key, v);
      envp[k++] = (char *)lua_tostring(L, -1);
      if (strcmp(key, "PATH") == 0) *pathv = envp[k - 1] + 5;
      lua_rawseti(L, hidx, ++hn);
      lua_pop(L, 2);
    }
  }
  envp[k] = NULL;
  lua_settop(L, ui);   /* keep the array on the stack */
  return envp;
}

static const char *const run_opts[] = {
  "cwd", "env", "env_clear", "stdin", "stdout", "stderr", "timeout",
  "check", "max_output", "kill_grace", NULL
};

/* Parse argv (index 1) and opts (index 2) into *p and c->desc; raises on
 * misuse.  Leaves temporaries on the stack. */
static void prepare(lua_State *L, plan *p, char *desc, int spawned,
                    int is_sh, const char *fname) {
  memset(p, 0, sizeof *p);
  if (lua_type(L, 1) == LUA_TSTRING)
    luaL_error(L, "%s: argv must be an array like {\"ls\", \"-l\"} (no "
               "shell is involved); use proc.sh for a shell command line",
               fname);
  luaL_checktype(L, 1, LUA_TTABLE);
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  rbe_check_known_fields(L, 2, fname, run_opts);
  int n = (int)luaL_len(L, 1);
  if (n < 1) luaL_error(L, "%s: argv is empty", fname);

  /* stack: argv, opts, holder, argv array */
  lua_createtable(L, n + 4, 0);
  int hidx = lua_gettop(L);
  char **av = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n + 1), 0);
  desc[0] = 0;
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    int secret = luaL_testudata(L, -1, RBE_SECRET_MT) != NULL;
    rbe_push_revealed(L, -1);
    char what[32];
    snprintf(what, sizeof what, "argv[%d]", i);
    size_t len;
    const char *s = check_string_value(L, -1, &len, fname, what);
    if (strlen(s) != len)
      luaL_error(L, "%s: argv[%d] contains a NUL byte", fname, i);
    av[i - 1] = (char *)s;
    if (!is_sh || i == 3) {
      if (secret) desc_add(desc, "***", 3, 0);
      else desc_add(desc, s, len, !is_sh);
    }
    lua_rawseti(L, hidx, i);
    lua_pop(L, 1);
  }
  av[n] = NULL;
  p->argv = av;

  p->cwd = rbe_opt_string_field(L, 2, "cwd", NULL, NULL);
  p->check = rbe_opt_bool_field(L, 2, "check", 1);
  p->timeout = rbe_opt_duration_field(L, 2, "timeout", 0);
  p->grace = rbe_opt_duration_field(L, 2, "kill_grace", KILL_GRACE);
  p->max_output = rbe_opt_int_field(L, 2, "max_output",
                                    spawned ? SPAWN_MAX_OUTPUT
                                            : RUN_MAX_OUTPUT);
  if (p->max_output < 0)
    luaL_error(L, "%s: max_output must be >= 0", fname);
  p->out_mode = io_mode(L, 2, "stdout", 0, fname);
  p->err_mode = io_mode(L, 2, "stderr", 1, fname);

  p->in_mode = IN_NULL;
  if (!lua_isnil(L, 2)) {
    lua_getfield(L, 2, "stdin");
    if (!lua_isnil(L, -1)) {
      if (spawned && lua_type(L, -1) == LUA_TSTRING &&
          strcmp(lua_tostring(L, -1), "pipe") == 0) {
        p->in_mode = IN_PIPE;
      } else {
        rbe_push_revealed(L, -1);
        p->in_data = check_string_value(L, -1, &p->in_len, fname,
                                        "option 'stdin'");
        if (p->in_len) p->in_mode = IN_DATA;
        lua_rawseti(L, hidx, n + 1);
      }
    }
    lua_pop(L, 1);
  }

  int envi = 0, clear = 0;
  const char *pathv;
  if (!lua_isnil(L, 2)) {
    clear = rbe_opt_bool_field(L, 2, "env_clear", 0);
    lua_getfield(L, 2, "env");
    if (!lua_isnil(L, -1)) {
      luaL_checktype(L, -1, LUA_TTABLE);
      envi = lua_gettop(L);
    }
  }
  if (envi || clear) p->envp = build_env(L, envi, clear, hidx, &pathv, fname);
  else { p->envp = environ; pathv = getenv("PATH"); }
  p->path = pathv;   /* resolved by the caller */
}

/* Resolve, allocate and start.  Returns the started child or raises. */
static child *launch(lua_State *L, plan *p, const char *desc, int spawned,
                     const char *fname) {
  char path[PATH_MAX];
  int r = resolve(p->argv[0], p->path, path, sizeof path);
  if (r < 0) {
    rbe_error_push(L, "proc", 0, "%s: `%s`: %s", fname, desc,
                   r == -ENOENT ? "executable not found in PATH"
                                : strerror(-r));
    rbe_error_code_str(L, strerrorname_np(-r));
    lua_pushstring(L, desc);
    lua_setfield(L, -2, "command");
    lua_error(L);
  }
  p->path = path;
  child *c = calloc(1, sizeof *c);
  char *in_copy = NULL;
  if (c && p->in_mode == IN_DATA) {
    in_copy = malloc(p->in_len);
    if (in_copy) memcpy(in_copy, p->in_data, p->in_len);
  }
  if (!c || (p->in_mode == IN_DATA && !in_copy)) {
    free(c);
    free(in_copy);
    luaL_error(L, "%s: out of memory", fname);
  }
  c->spawned = spawned;
  c->check = p->check;
  c->timeout = p->timeout;
  c->grace = p->grace;
  c->in_mode = p->in_mode;
  c->in_data = in_copy;
  c->in_len = p->in_len;
  c->buf[0].max = c->buf[1].max = (size_t)p->max_output;
  c->what = fname;
  for (int i = 0; i < NSLOTS; i++) c->slots[i].c = c;
  strcpy(c->desc, desc);

  int stage;
  r = start_child(c, p, &stage);
  if (r < 0) {
    int reaped = c->reaped;
    if (reaped) {
      c->pid = 0;    /* unlink it; maybe_free sees a reaped, idle child */
      maybe_free(c);
    } else {
      free(c->in_data);
      free(c);
    }
    const char *why = stage == ST_CHDIR ? "cannot change directory to "
                    : stage == ST_EXEC ? "cannot execute "
                    : stage == ST_DUP ? "cannot set up stdio for "
                    : "cannot start ";
    const char *obj = stage == ST_CHDIR ? p->cwd : p->argv[0];
    rbe_error_push(L, "proc", 0, "%s: `%s`: %s%s: %s", fname, desc, why,
                   obj, strerror(-r));
    const char *name = strerrorname_np(-r);
    rbe_error_code_str(L, name ? name : "EIO");
    lua_pushstring(L, desc);
    lua_setfield(L, -2, "command");
    lua_error(L);
  }
  return c;
}

/* ---- proc.run / proc.sh ---- */

static int run_common(lua_State *L, int is_sh, const char *fname) {
  plan p;
  char desc[DESC_MAX];
  prepare(L, &p, desc, 0, is_sh, fname);
  rbe_wait *w = rbe_wait_new(L, fname);
  child *c = launch(L, &p, desc, 0, fname);
  /* past this point nothing raises */
  c->run_w = w;
  c->pending = 1;
  return rbe_wait_yield(L, w, run_cancel, c);
}

/* proc.run(argv, opts) -> {code, signal, stdout, stderr, pid, elapsed,
 * truncated}  [yields] */
static int l_run(lua_State *L) {
  return run_common(L, 0, "proc.run");
}

/* Replace a command line at index 1 by {"/bin/sh", "-c", cmdline}. */
static void sh_argv(lua_State *L, const char *fname) {
  if (lua_type(L, 1) != LUA_TSTRING && !luaL_testudata(L, 1, RBE_SECRET_MT))
    luaL_error(L, "%s: command line string expected, got %s", fname,
               luaL_typename(L, 1));
  lua_createtable(L, 3, 0);
  lua_pushliteral(L, "/bin/sh");
  lua_rawseti(L, -2, 1);
  lua_pushliteral(L, "-c");
  lua_rawseti(L, -2, 2);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, 3);
  lua_replace(L, 1);
}

/* proc.sh(cmdline, opts) -> like proc.run, through /bin/sh -c  [yields] */
static int l_sh(lua_State *L) {
  sh_argv(L, "proc.sh");
  return run_common(L, 1, "proc.sh");
}

/* ---- proc.spawn and the child handle ---- */

static child_ud *check_ud(lua_State *L, int idx) {
  child_ud *u = luaL_checkudata(L, idx, CHILD_MT);
  if (!u->c) luaL_error(L, "child handle is gone");
  return u;
}

static child *check_open(lua_State *L, const char *fname) {
  child_ud *u = check_ud(L, 1);
  if (u->closed) luaL_error(L, "%s: child `%s` is closed", fname, u->c->desc);
  return u->c;
}

static int spawn_common(lua_State *L, int is_sh, const char *fname) {
  plan p;
  char desc[DESC_MAX];
  prepare(L, &p, desc, 1, is_sh, fname);
  child_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->c = NULL;
  u->closed = 0;
  luaL_setmetatable(L, CHILD_MT);
  int ui = lua_gettop(L);
  child *c = launch(L, &p, desc, 1, fname);
  u->c = c;
  c->owned = 1;
  lua_settop(L, ui);
  return 1;
}

/* proc.spawn(argv, opts) -> child  (does not wait) */
static int l_spawn(lua_State *L) {
  return spawn_common(L, 0, "proc.spawn");
}

/* proc.spawn_sh(cmdline, opts) -> child, through /bin/sh -c */
static int l_spawn_sh(lua_State *L) {
  sh_argv(L, "proc.spawn_sh");
  return spawn_common(L, 1, "proc.spawn_sh");
}

/* Park the current task on slot k of c; the continuation re-checks. */
static int park(lua_State *L, child *c, int k, rbe_wait *w,
                const char *fname, lua_KFunction kf) {
  slot *s = &c->slots[k];
  if (s->w)
    return luaL_error(L, "%s: another task is already waiting on this "
                      "child", fname);
  /* past this point nothing raises */
  s->w = w;
  s->err = 0;
  c->pending++;
  return rbe_wait_yieldk(L, w, slot_cancel, s, kf);
}

static int wait_result(lua_State *L, child *c) {
  if (push_outcome(L, c)) return lua_error(L);
  return 1;
}

static int child_wait_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  rbe_wait_values(L, ctx);
  child *c = check_ud(L, 1)->c;
  if (c->completed) return wait_result(L, c);
  rbe_wait *w = rbe_wait_new(L, "child:wait");
  return park(L, c, SLOT_WAIT, w, "child:wait", child_wait_k);
}

/* child:wait() -> result like proc.run's (raises per `check`)  [yields]
 * Works after :close() too (then the result is the killed child's). */
static int child_wait(lua_State *L) {
  child *c = check_ud(L, 1)->c;
  lua_settop(L, 1);
  if (c->completed) return wait_result(L, c);
  rbe_wait *w = rbe_wait_new(L, "child:wait");
  return park(L, c, SLOT_WAIT, w, "child:wait", child_wait_k);
}

static int lines_next(lua_State *L);

static int lines_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  rbe_wait_values(L, ctx);
  return lines_next(L);
}

/* The iterator of child:lines(): upvalues (child handle, stream index). */
static int lines_next(lua_State *L) {
  child_ud *u = luaL_checkudata(L, lua_upvalueindex(1), CHILD_MT);
  int i = (int)lua_tointeger(L, lua_upvalueindex(2));
  if (!u->c) return luaL_error(L, "child handle is gone");
  if (u->closed)
    return luaL_error(L, "child:lines: child `%s` is closed", u->c->desc);
  child *c = u->c;
  obuf *b = &c->buf[i];
  const char *s = b->data ? b->data + b->start : "";
  size_t n = b->len - b->start;
  const char *nl = n ? memchr(s, '\n', n) : NULL;
  int open = i == S_OUT ? c->out_open : c->err_open;
  if (nl || (n && (!open || n >= b->max))) {
    /* a line, the unterminated rest at EOF, or a full buffer */
    size_t len = nl ? (size_t)(nl - s) : n;
    size_t eat = nl ? len + 1 : n;
    if (len && s[len - 1] == '\r') len--;
    lua_pushlstring(L, s, len);
    b->start += eat;
    if (b->start == b->len) b->start = b->len = 0;
    return 1;
  }
  if (!open) { lua_pushnil(L); return 1; }
  rbe_wait *w = rbe_wait_new(L, "child:lines");
  return park(L, c, SLOT_OUT + i, w, "child:lines", lines_k);
}

/* child:lines([stream]) -> iterator over the lines of stdout (or
 * "stderr") as they arrive, without the newline  [the iterator yields] */
static int child_lines(lua_State *L) {
  child *c = check_open(L, "child:lines");
  const char *which = luaL_optstring(L, 2, "stdout");
  int i;
  if (strcmp(which, "stdout") == 0) i = S_OUT;
  else if (strcmp(which, "stderr") == 0) i = S_ERR;
  else return luaL_error(L, "child:lines: stream must be \"stdout\" or "
                         "\"stderr\", got '%s'", which);
  if (!(i == S_OUT ? c->pout.data : c->perr.data))
    return luaL_error(L, "child:lines: %s of `%s` is not captured "
                      "(spawned with %s = \"null\"/\"inherit\")", which,
                      c->desc, which);
  lua_pushvalue(L, 1);
  lua_pushinteger(L, i);
  lua_pushcclosure(L, lines_next, 2);
  return 1;
}

static void write_cb(uv_write_t *req, int status) {
  write_req *r = (write_req *)req;
  child *c = r->c;
  free(r);
  slot *s = &c->slots[SLOT_WRITE];
  if (s->w) {
    s->err = status < 0 ? (status == UV_ECANCELED ? UV_EPIPE : status) : 0;
    wake(c, SLOT_WRITE);
  }
}

static int child_write_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  rbe_wait_values(L, ctx);
  lua_pushvalue(L, 1);
  return 1;
}

/* child:write(s) -> child; yields while the pipe is full  [yields] */
static int child_write(lua_State *L) {
  child *c = check_open(L, "child:write");
  lua_settop(L, 2);
  rbe_push_revealed(L, 2);
  size_t len;
  const char *s = check_string_value(L, -1, &len, "child:write", "data");
  if (c->in_mode != IN_PIPE)
    return luaL_error(L, "child:write: stdin of `%s` is not a pipe (spawn "
                      "it with stdin = \"pipe\")", c->desc);
  if (c->slots[SLOT_WRITE].w)
    return luaL_error(L, "child:write: another task is writing to this "
                      "child");
  rbe_wait *w = rbe_wait_new(L, "child:write");
  if (!c->in_open) {
    rbe_error_push(L, "proc", 0, "child:write: stdin of `%s` is closed",
                   c->desc);
    rbe_error_code_str(L, "EPIPE");
    return lua_error(L);
  }
  lua_pushvalue(L, 1);     /* the result: the child, for chaining */
  if (!len) return 1;
  uv_buf_t b = uv_buf_init((char *)s, (unsigned)len);
  int n = uv_try_write((uv_stream_t *)&c->pin, &b, 1);
  if (n == (int)len) return 1;
  if (n < 0 && n != UV_EAGAIN) {
    rbe_error_push_uv(L, "proc", n, "child:write: `%s`", c->desc);
    return lua_error(L);
  }
  if (n < 0) n = 0;
  write_req *r = malloc(sizeof *r + (len - (size_t)n));
  if (!r) return luaL_error(L, "child:write: out of memory");
  memcpy(r->data, s + n, len - (size_t)n);
  r->c = c;
  b = uv_buf_init(r->data, (unsigned)(len - (size_t)n));
  int e = uv_write(&r->req, (uv_stream_t *)&c->pin, &b, 1, write_cb);
  if (e < 0) {
    free(r);
    rbe_error_push_uv(L, "proc", e, "child:write: `%s`", c->desc);
    return lua_error(L);
  }
  return park(L, c, SLOT_WRITE, w, "child:write", child_write_k);
}

/* child:close_stdin() -> nothing: the child reads EOF */
static int child_close_stdin(lua_State *L) {
  child *c = check_ud(L, 1)->c;
  close_stdin(c);
  return 0;
}

/* child:kill([sig]) -> true if sent, false if the child already finished.
 * sig: "SIGTERM" (default), "TERM", "KILL", ... or a number; sent to the
 * child's whole process group. */
static int child_kill(lua_State *L) {
  child *c = check_ud(L, 1)->c;
  int sig = SIGTERM;
  if (!lua_isnoneornil(L, 2)) {
    sig = sig_parse(L, 2);
    if (sig < 0)
      return luaL_error(L, "child:kill: unknown signal '%s'",
                        luaL_tolstring(L, 2, NULL));
  }
  if (c->completed) { lua_pushboolean(L, 0); return 1; }
  signal_group(c, sig);
  lua_pushboolean(L, 1);
  return 1;
}

/* child:running() -> boolean: not yet exited (or its output still open) */
static int child_running(lua_State *L) {
  lua_pushboolean(L, !check_ud(L, 1)->c->completed);
  return 1;
}

/* child:close() -> nothing: SIGTERM to the group if still running, then
 * SIGKILL after kill_grace.  Closing twice is fine. */
static int child_close(lua_State *L) {
  child_ud *u = luaL_checkudata(L, 1, CHILD_MT);
  if (!u->c || u->closed) return 0;
  u->closed = 1;
  child_terminate(u->c);
  return 0;
}

static int child_gc(lua_State *L) {
  child_ud *u = luaL_checkudata(L, 1, CHILD_MT);
  child *c = u->c;
  if (!c) return 0;
  u->c = NULL;
  u->closed = 1;
  child_terminate(c);
  c->owned = 0;
  maybe_free(c);
  return 0;
}

static int child_tostring(lua_State *L) {
  child_ud *u = luaL_checkudata(L, 1, CHILD_MT);
  if (!u->c) lua_pushliteral(L, "child (gone)");
  else lua_pushfstring(L, "child %d `%s` (%s)", (int)u->c->pid, u->c->desc,
                       u->c->completed ? "exited" : "running");
  return 1;
}

/* child.pid, then the methods */
static int child_index(lua_State *L) {
  child_ud *u = luaL_checkudata(L, 1, CHILD_MT);
  const char *k = lua_tostring(L, 2);
  if (k && strcmp(k, "pid") == 0) {
    if (u->c) lua_pushinteger(L, u->c->pid);
    else lua_pushnil(L);
    return 1;
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

/* proc.core._stats() -> {children = structs alive, live = unreaped} */
static int l_stats(lua_State *L) {
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, S.nchildren);
  lua_setfield(L, -2, "children");
  lua_pushinteger(L, S.live);
  lua_setfield(L, -2, "live");
  return 1;
}

static const luaL_Reg child_methods[] = {
  {"wait", child_wait},
  {"lines", child_lines},
  {"write", child_write},
  {"close_stdin", child_close_stdin},
  {"kill", child_kill},
  {"running", child_running},
  {"close", child_close},
  {NULL, NULL}
};

static const luaL_Reg proc_funcs[] = {
  {"run", l_run},
  {"sh", l_sh},
  {"spawn", l_spawn},
  {"spawn_sh", l_spawn_sh},
  {"_stats", l_stats},
  {NULL, NULL}
};

static void init_once(void) {
  if (S.inited) return;
  S.inited = 1;
  S.devnull = fd_high(open("/dev/null", O_RDWR | O_CLOEXEC));
  uv_signal_init(rbe_loop(), &S.sigchld);
  uv_signal_start(&S.sigchld, sigchld_cb, SIGCHLD);
  uv_unref((uv_handle_t *)&S.sigchld);
  atexit(kill_all_at_exit);
}

int luaopen_rbe_proc(lua_State *L) {
  init_once();
  if (luaL_newmetatable(L, CHILD_MT)) {
    luaL_newlib(L, child_methods);
    lua_pushcclosure(L, child_index, 1);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, child_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, child_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, child_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  luaL_newlib(L, proc_funcs);
  return 1;
}
