/* repl.c: the terminal side of `rbe repl` (module "rbe.repl.core", wrapped
 * by lua/rbe/repl.lua).  It binds libedit's readline-compatible callback
 * interface: rl_callback_handler_install prints the prompt and puts the
 * terminal in raw mode, a uv_poll on stdin feeds rl_callback_read_char one
 * key at a time, so the loop (and every background task) keeps running
 * while the prompt waits.  When stdin is not a terminal, lines are read
 * from the same poll (or with plain read(2) for a regular file) without a
 * prompt or editing.
 *
 * Ownership: everything lives in one static struct R, because libedit's
 * readline layer is global state too.  core.start() initialises the stdin
 * poll, a SIGWINCH watcher, an async handle for SIGINT and the spinner
 * timer; core.stop() (or the __gc of the module's guard at lua_close)
 * removes the handler, restores the terminal and rbe's own SIGINT
 * disposition, and closes the handles (counted in RBE_COUNT_HANDLES until
 * their close callbacks ran).  At most one task waits for a line (read_w)
 * and at most one for a Ctrl-C (int_w); their cancel functions only stop
 * the poll / drop the waiter.  The line handed to Lua is malloc'd by
 * libedit (or copied from the read buffer) and freed by the push function.
 *
 * SIGINT is taken over from core/main.c while the REPL runs (sigaction,
 * restored by stop): the handler only counts, wakes the loop through the
 * async handle and, when the task evaluating the current line is the one
 * running Lua code (a busy loop), makes it stop at its next instruction
 * like lua.c does.  A third Ctrl-C while a line is still unwinding kills
 * the children and exits 130, as rbe's own handler does on the second. */
#include "aux.h"
#include "task.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <locale.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <editline/readline.h>
#include <histedit.h>

#define GUARD_MT "rbe.repl.guard"
#define NHANDLES 4

void rbe_proc_kill_all(int sig);

enum { RES_NONE, RES_LINE, RES_EOF, RES_INT };

static struct {
  int started;
  int edit;                    /* libedit on a terminal (else plain) */
  lua_State *L;                /* main thread: completion calls */
  uv_poll_t poll;
  int poll_ok;                 /* stdin can be polled */
  int polling;
  uv_signal_t winch;
  uv_async_t async;
  uv_timer_t spin;
  int open_handles;            /* handles whose close callback is due */
  struct sigaction old_int;
  int stdin_flags;             /* uv_poll_init makes stdin non-blocking */
  pthread_t loop_thread;

  /* the line being read */
  rbe_wait *read_w;
  int prompt_shown;            /* handler installed: prompt on screen */
  int typed;                   /* length of the line being edited */
  int res;
  char *res_line;              /* malloc'd */
  size_t res_len;
  int res_had_text;            /* Ctrl-C discarded typed text */
  long read_base;              /* signals counted before this read */

  /* plain mode: bytes read ahead of the current line */
  char *buf;
  size_t len, cap;
  int eof;

  /* Ctrl-C */
  volatile sig_atomic_t sigs;  /* counted by the handler */
  volatile sig_atomic_t line_sigs;
  long sigs_seen;
  long pending_int;
  rbe_wait *int_w;
  rbe_task *volatile line_task;

  int completer_ref;

  /* spinner */
  int spin_on, spin_visible, spin_frame;
  uint64_t spin_start;
  char spin_label[64];
} R;

/* ---- small helpers ---- */

static void handle_close_cb(uv_handle_t *h) {
  (void)h;
  R.open_handles--;
  rbe_counts[RBE_COUNT_HANDLES]--;
}

static void poll_stop(void) {
  if (R.polling) {
    uv_poll_stop(&R.poll);
    R.polling = 0;
  }
}

static void spin_clear(void) {
  if (R.spin_visible) {
    fputs("\r\033[K", stderr);
    fflush(stderr);
    R.spin_visible = 0;
  }
}

static void clear_result(void) {
  free(R.res_line);
  R.res_line = NULL;
  R.res_len = 0;
  R.res = RES_NONE;
  R.res_had_text = 0;
}

/* push function of the read wait: line | nil (EOF) | false, had_text */
static int read_push(lua_State *L, void *ud) {
  (void)ud;
  int n = 1;
  if (L) {
    if (R.res == RES_LINE) lua_pushlstring(L, R.res_line, R.res_len);
    else if (R.res == RES_INT) {
      lua_pushboolean(L, 0);
      lua_pushboolean(L, R.res_had_text);
      n = 2;
    } else lua_pushnil(L);
  }
  clear_result();
  return L ? n : 0;
}

/* hand the result (line: malloc'd, ours now) to the waiting read */
static void read_complete(int res, char *line, size_t len) {
  rbe_wait *w = R.read_w;
  R.read_w = NULL;
  poll_stop();
  clear_result();
  if (!w) {
    free(line);
    return;
  }
  R.res = res;
  R.res_line = line;
  R.res_len = len;
  rbe_wait_done(w, read_push, NULL);
}

/* ---- libedit ---- */

static void line_cb(char *line) {
  /* rl_callback_read_char already left raw mode (EL_UNBUFFERED 0) */
  rl_callback_handler_remove();
  R.prompt_shown = 0;
  if (!line) {
    fputs("\n", stdout);
    fflush(stdout);
    read_complete(RES_EOF, NULL, 0);
  } else {
    read_complete(RES_LINE, line, strlen(line));
  }
}

static char *dupn(const char *s, size_t n) {
  char *d = malloc(n + 1);
  if (!d) return NULL;
  memcpy(d, s, n);
  d[n] = 0;
  return d;
}

/* Completion hook: the Lua completer gets (word, line before the word) and
 * returns full replacements for the word.  It runs from the poll callback
 * on the main thread, outside any task, so it must not wait. */
static char **complete_cb(const char *text, int start, int end) {
  (void)end;
  rl_attempted_completion_over = 1;     /* never fall back to file names */
  if (R.completer_ref == LUA_NOREF || !R.L) return NULL;
  lua_State *L = R.L;
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, R.completer_ref);
  lua_pushstring(L, text);
  size_t blen = rl_line_buffer ? strlen(rl_line_buffer) : 0;
  if (start < 0 || (size_t)start > blen) start = (int)blen;
  lua_pushlstring(L, rl_line_buffer ? rl_line_buffer : "", (size_t)start);
  char **m = NULL;
  if (lua_pcall(L, 2, 1, 0) != LUA_OK || !lua_istable(L, -1)) goto done;
  lua_Integer n = luaL_len(L, -1);
  if (n <= 0 || n > 100000) goto done;
  m = calloc((size_t)n + 2, sizeof *m);
  if (!m) goto done;
  size_t lcp = 0;
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    size_t len = 0;
    const char *s = lua_tolstring(L, -1, &len);
    if (!s) len = 0;
    m[i] = dupn(s ? s : "", len);
    lua_pop(L, 1);
    if (!m[i]) goto oom;
    if (i == 1) lcp = len;
    size_t k = 0;
    while (k < lcp && m[1][k] == m[i][k]) k++;
    lcp = k;
  }
  if (n == 1) {
    m[0] = m[1];
    m[1] = NULL;
  } else if (!(m[0] = dupn(m[1], lcp))) {
    goto oom;
  }
  goto done;
oom:
  for (lua_Integer j = 0; j <= n; j++) free(m[j]);
  free(m);
  m = NULL;
done:
  lua_settop(L, top);
  return m;
}

/* ---- stdin ---- */

/* plain mode: take one line out of the buffer if there is one */
static int plain_take_line(void) {
  char *nl = R.len ? memchr(R.buf, '\n', R.len) : NULL;
  if (!nl && !(R.eof && R.len)) return 0;
  size_t n = nl ? (size_t)(nl - R.buf) : R.len;
  size_t used = nl ? n + 1 : n;
  size_t keep = n;
  if (keep && R.buf[keep - 1] == '\r') keep--;
  char *line = dupn(R.buf, keep);
  memmove(R.buf, R.buf + used, R.len - used);
  R.len -= used;
  clear_result();
  R.res = RES_LINE;
  R.res_line = line;
  R.res_len = line ? keep : 0;
  return 1;
}

/* read what is there into the buffer; 0 ok, -1 EOF or error */
static int plain_fill(void) {
  if (R.cap - R.len < 4096) {
    size_t cap = R.cap ? R.cap * 2 : 8192;
    char *b = realloc(R.buf, cap);
    if (!b) return -1;
    R.buf = b;
    R.cap = cap;
  }
  ssize_t n;
  do n = read(0, R.buf + R.len, R.cap - R.len);
  while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
  if (n <= 0) { R.eof = 1; return -1; }
  R.len += (size_t)n;
  return 0;
}

static void poll_cb(uv_poll_t *p, int status, int events) {
  (void)p;
  if (!R.read_w) { poll_stop(); return; }
  if (R.edit) {
    if (status < 0 || ((events & UV_DISCONNECT) && !(events & UV_READABLE))) {
      /* the terminal went away: end the session as on Ctrl-D */
      rl_callback_handler_remove();
      R.prompt_shown = 0;
      read_complete(RES_EOF, NULL, 0);
      return;
    }
    rl_callback_read_char();
    if (R.prompt_shown) R.typed = rl_end;
    return;
  }
  if (status < 0) R.eof = 1;
  else plain_fill();
  if (plain_take_line()) {
    char *line = R.res_line;
    size_t len = R.res_len;
    R.res_line = NULL;
    read_complete(RES_LINE, line, len);
  } else if (R.eof) {
    read_complete(RES_EOF, NULL, 0);
  }
}

static void read_cancel(void *ud) {
  (void)ud;
  R.read_w = NULL;
  poll_stop();
  if (R.prompt_shown) {
    rl_callback_handler_remove();
    R.prompt_shown = 0;
    fputs("\n", stdout);
    fflush(stdout);
  }
}

/* core.read(prompt) -> line | nil (end of input) | false, had_text (Ctrl-C)
 * [yields]  In plain mode the prompt is not printed. */
static int l_read(lua_State *L) {
  const char *prompt = luaL_optstring(L, 1, "");
  if (!R.started) return luaL_error(L, "repl.read: the console is not started");
  if (R.read_w) return luaL_error(L, "repl.read: already reading");
  R.read_base = R.sigs;
  if (!R.edit) {
    if (plain_take_line()) return read_push(L, NULL);
    if (R.eof) { lua_pushnil(L); return 1; }
    if (!R.poll_ok) {
      /* a regular file: read(2) never waits long */
      while (!plain_take_line() && !R.eof) plain_fill();
      if (R.res == RES_LINE) return read_push(L, NULL);
      lua_pushnil(L);
      return 1;
    }
  }
  rbe_wait *w = rbe_wait_new(L, "repl.read");
  /* past this point nothing raises until the yield */
  R.read_w = w;
  fflush(stdout);
  spin_clear();
  if (R.edit) {
    rl_callback_handler_install(prompt, line_cb);
    R.prompt_shown = 1;
    R.typed = 0;          /* rl_end still tells the last line's length */
  }
  if (R.poll_ok && !R.polling) {
    uv_poll_start(&R.poll, UV_READABLE | UV_DISCONNECT, poll_cb);
    R.polling = 1;
  }
  return rbe_wait_yield(L, w, read_cancel, NULL);
}

/* ---- Ctrl-C ---- */

static void on_sigint(int sig) {
  (void)sig;
  R.sigs++;
  if (R.line_task) {
    if (++R.line_sigs >= 3) {
      /* the line ignores cancellation: leave like rbe does */
      static const char msg[] = "\nrbe: killed (Ctrl-C three times)\n";
      ssize_t w = write(2, msg, sizeof msg - 1);
      (void)w;
      rbe_proc_kill_all(SIGKILL);
      _exit(130);
    }
    /* a line stuck in Lua code never lets the loop run: stop it there */
    if (pthread_equal(pthread_self(), R.loop_thread) &&
        rbe_task_current() == R.line_task && R.line_sigs == 1)
      rbe_sched_interrupt_running();
  }
  uv_async_send(&R.async);
}

static int int_push(lua_State *L, void *ud) {
  if (!L) return 0;
  lua_pushinteger(L, (lua_Integer)(intptr_t)ud);
  return 1;
}

static void async_cb(uv_async_t *h) {
  (void)h;
  long now = R.sigs;
  long fresh = now - R.sigs_seen;
  if (fresh <= 0) return;
  R.sigs_seen = now;
  if (R.int_w) {
    rbe_wait *w = R.int_w;
    R.int_w = NULL;
    rbe_wait_done(w, int_push, (void *)(intptr_t)fresh);
  } else if (R.read_w && now > R.read_base) {
    int had = 0;
    if (R.edit && R.prompt_shown) {
      had = R.typed > 0;
      fputs("^C", stdout);
      rl_callback_handler_remove();   /* back to cooked mode */
      R.prompt_shown = 0;
      fputs("\n", stdout);
      fflush(stdout);
    } else if (!R.edit) {
      had = R.len > 0;
    }
    read_complete(RES_INT, NULL, 0);
    R.res_had_text = had;
  } else {
    R.pending_int += fresh;
  }
}

static void int_cancel(void *ud) {
  (void)ud;
  R.int_w = NULL;
}

/* core.wait_interrupt() -> number of Ctrl-C since the last call  [yields] */
static int l_wait_interrupt(lua_State *L) {
  if (!R.started) return luaL_error(L, "repl.wait_interrupt: not started");
  if (R.int_w) return luaL_error(L, "repl.wait_interrupt: already waiting");
  if (R.pending_int > 0) {
    lua_pushinteger(L, R.pending_int);
    R.pending_int = 0;
    return 1;
  }
  rbe_wait *w = rbe_wait_new(L, "repl.wait_interrupt");
  R.int_w = w;
  return rbe_wait_yield(L, w, int_cancel, NULL);
}

/* core.line_task(task|nil) -> number of Ctrl-C during the previous line
 * Names the task evaluating the current line (Ctrl-C stops it even inside
 * a busy loop); forgets a Ctrl-C nobody waited for. */
static int l_line_task(lua_State *L) {
  rbe_task *t = lua_isnoneornil(L, 1) ? NULL : luaL_checkudata(L, 1, "rbe.task");
  lua_pushinteger(L, R.line_sigs);
  R.line_sigs = 0;
  R.pending_int = 0;
  R.line_task = t;
  return 1;
}

/* core.cancel_all(reason) -> nothing: cancel every other live task (the
 * helpers modules started from the prompt, at exit) */
static int l_cancel_all(lua_State *L) {
  const char *why = luaL_optstring(L, 1, "the console exited");
  /* the reason must outlive the tasks: keep a static copy */
  static char reason[128];
  snprintf(reason, sizeof reason, "%s", why);
  rbe_sched_cancel_all(reason, 0);
  return 0;
}

/* ---- output ---- */

/* core.output(fd, text) -> nothing: write text to stdout (1) or stderr (2)
 * without breaking the prompt: above it when one is on screen, after
 * clearing the spinner otherwise; a missing final newline is added when
 * the prompt is redrawn. */
static int l_output(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  FILE *f = fd == 2 ? stderr : stdout;
  if (R.prompt_shown) {
    fputs("\r\033[K", stdout);
    fflush(stdout);
    fwrite(s, 1, n, f);
    if (n == 0 || s[n - 1] != '\n') fputc('\n', f);
    fflush(f);
    rl_forced_update_display();
    fflush(stdout);
  } else {
    spin_clear();
    fwrite(s, 1, n, f);
    fflush(f);
  }
  return 0;
}

/* ---- spinner ---- */

static void spin_cb(uv_timer_t *t) {
  static const char frames[] = "|/-\\";
  double secs = (double)(uv_now(t->loop) - R.spin_start) / 1000.0;
  fprintf(stderr, "\r%c %s %.1fs  (Ctrl-C cancels)\033[K",
          frames[R.spin_frame++ % 4], R.spin_label, secs);
  fflush(stderr);
  R.spin_visible = 1;
}

/* core.spinner(on[, label]) -> nothing: on shows a spinner on stderr after
 * one second (and every 100 ms then); off stops and erases it. */
static int l_spinner(lua_State *L) {
  int on = lua_toboolean(L, 1);
  const char *label = luaL_optstring(L, 2, "running");
  if (!R.started) return 0;
  if (on) {
    snprintf(R.spin_label, sizeof R.spin_label, "%s", label);
    R.spin_start = uv_now(rbe_loop());
    R.spin_frame = 0;
    R.spin_on = 1;
    uv_timer_start(&R.spin, spin_cb, 1000, 100);
  } else {
    R.spin_on = 0;
    uv_timer_stop(&R.spin);
    spin_clear();
  }
  return 0;
}

/* ---- terminal size ---- */

static void winch_cb(uv_signal_t *h, int sig) {
  (void)h; (void)sig;
  if (R.prompt_shown) rl_resize_terminal();
}

/* core.term_size() -> columns, rows (80, 24 when unknown) */
static int l_term_size(lua_State *L) {
  struct winsize ws;
  int cols = 80, rows = 24;
  if (ioctl(1, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) {
    cols = ws.ws_col;
    rows = ws.ws_row;
  }
  lua_pushinteger(L, cols);
  lua_pushinteger(L, rows);
  return 2;
}

/* core.isatty(fd) -> boolean */
static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

/* ---- history ---- */

/* core.history_add(line) -> nothing (the in-memory list up-arrow walks) */
static int l_history_add(lua_State *L) {
  const char *line = luaL_checkstring(L, 1);
  if (R.edit && *line) add_history(line);
  return 0;
}

/* core.history_append(path, text) -> true | nil, message
 * Appends to the history file, creating it 0600 and putting it back to
 * 0600 if it was opened up (history may hold host names and queries). */
static int l_history_append(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW,
                0600);
  const char *step = "open";
  if (fd < 0) goto fail;
  struct stat st;
  step = "chmod";
  if (fstat(fd, &st) == 0 && (st.st_mode & 07777) != 0600 &&
      fchmod(fd, 0600) < 0)
    goto fail;
  step = "write";
  while (n > 0) {
    ssize_t w = write(fd, s, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) goto fail;
    s += w;
    n -= (size_t)w;
  }
  close(fd);
  lua_pushboolean(L, 1);
  return 1;
fail:;
  int e = errno;
  if (fd >= 0) close(fd);
  lua_pushnil(L);
  lua_pushfstring(L, "%s (%s): %s", path, step, strerror(e));
  return 2;
}

/* ---- identity ---- */

/* core.identity() -> {user, host, pid} */
static int l_identity(lua_State *L) {
  lua_createtable(L, 0, 3);
  uv_passwd_t pw;
  if (uv_os_get_passwd(&pw) == 0) {
    lua_pushstring(L, pw.username);
    uv_os_free_passwd(&pw);
  } else {
    const char *u = getenv("USER");
    lua_pushstring(L, u ? u : "?");
  }
  lua_setfield(L, -2, "user");
  char host[256];
  size_t hn = sizeof host;
  if (uv_os_gethostname(host, &hn) == 0) lua_pushstring(L, host);
  else lua_pushliteral(L, "?");
  lua_setfield(L, -2, "host");
  lua_pushinteger(L, (lua_Integer)getpid());
  lua_setfield(L, -2, "pid");
  return 1;
}

/* ---- life cycle ---- */

/* core.start{edit = bool, completer = fn, name = "rbe"} -> nothing */
static int l_start(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  static const char *const known[] = {"edit", "completer", "name", NULL};
  rbe_check_known_fields(L, 1, "repl.start", known);
  if (R.started) return luaL_error(L, "repl.start: already started");
  if (R.open_handles) return luaL_error(L, "repl.start: still closing");
  int edit = rbe_opt_bool_field(L, 1, "edit", 0);
  lua_getfield(L, 1, "completer");
  int has_completer = lua_isfunction(L, -1);
  lua_pop(L, 1);
  uv_loop_t *loop = rbe_loop();

  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  R.L = lua_tothread(L, -1);
  lua_pop(L, 1);
  R.completer_ref = LUA_NOREF;
  if (has_completer) {
    lua_getfield(L, 1, "completer");
    R.completer_ref = rbe_ref(L);
  }
  R.edit = edit;
  R.started = 1;
  R.loop_thread = pthread_self();
  R.sigs = R.sigs_seen = 0;
  R.pending_int = 0;
  R.eof = 0;
  R.len = 0;

  /* stdin's file description is shared with the shell: keep its flags
   * (libuv sets O_NONBLOCK; libedit reads one blocking key at a time) */
  R.stdin_flags = fcntl(0, F_GETFL);
  R.poll_ok = uv_poll_init(loop, &R.poll, 0) == 0;
  if (R.poll_ok) {
    R.open_handles++;
    rbe_counts[RBE_COUNT_HANDLES]++;
  }
  if (R.stdin_flags >= 0) fcntl(0, F_SETFL, R.stdin_flags);
  uv_signal_init(loop, &R.winch);
  uv_unref((uv_handle_t *)&R.winch);
  uv_async_init(loop, &R.async, async_cb);
  uv_unref((uv_handle_t *)&R.async);
  uv_timer_init(loop, &R.spin);
  uv_unref((uv_handle_t *)&R.spin);
  R.open_handles += 3;
  rbe_counts[RBE_COUNT_HANDLES] += 3;

  if (edit) {
    /* libedit drops UTF-8 input unless the locale says so; numbers keep
     * the C locale (Lua's tostring and JSON) */
    setlocale(LC_ALL, "");
    setlocale(LC_NUMERIC, "C");
    rl_catch_signals = 0;           /* SIGINT/SIGWINCH are ours */
    rl_readline_name = "rbe";
    rl_initialize();
    rl_attempted_completion_function = complete_cb;
    rl_basic_word_break_characters = " \t\n\"'`@$><=;|&{(,)[]+-*/%^~#";
    rl_completion_append_character = '\0';
    stifle_history(1000);
    uv_signal_start(&R.winch, winch_cb, SIGWINCH);
  }

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &R.old_int);
  return 0;
}

static void repl_stop(lua_State *L) {
  if (!R.started) return;
  R.started = 0;
  sigaction(SIGINT, &R.old_int, NULL);
  if (R.prompt_shown) {
    rl_callback_handler_remove();
    R.prompt_shown = 0;
  }
  R.read_w = NULL;      /* a pending read was cancelled with its task */
  R.int_w = NULL;
  R.line_task = NULL;
  poll_stop();
  R.spin_on = 0;
  uv_timer_stop(&R.spin);
  spin_clear();
  fflush(stdout);
  if (R.poll_ok) uv_close((uv_handle_t *)&R.poll, handle_close_cb);
  uv_close((uv_handle_t *)&R.winch, handle_close_cb);
  uv_close((uv_handle_t *)&R.async, handle_close_cb);
  uv_close((uv_handle_t *)&R.spin, handle_close_cb);
  R.poll_ok = 0;
  if (R.stdin_flags >= 0) fcntl(0, F_SETFL, R.stdin_flags);
  if (L) rbe_unref(L, &R.completer_ref);
  else R.completer_ref = LUA_NOREF;
  R.L = NULL;
  clear_result();
  free(R.buf);
  R.buf = NULL;
  R.len = R.cap = 0;
}

/* core.stop() -> nothing: terminal, SIGINT and handles back as they were;
 * stopping twice is fine */
static int l_stop(lua_State *L) {
  repl_stop(L);
  return 0;
}

static int guard_gc(lua_State *L) {
  /* lua_close: the registry is going away, only release C resources */
  if (R.started) {
    R.completer_ref = LUA_NOREF;
    repl_stop(NULL);
  }
  (void)L;
  return 0;
}

/* ---- versions ---- */

/* The version of the libedit actually loaded, from its file name
 * (libedit.so.2.0.70), else the histedit API the module was built with. */
static void push_libedit_version(lua_State *L) {
  Dl_info info;
  char real[PATH_MAX];
  if (dladdr((void *)el_init, &info) && info.dli_fname &&
      realpath(info.dli_fname, real)) {
    const char *so = strstr(real, ".so.");
    if (so && so[4]) { lua_pushstring(L, so + 4); return; }
  }
  lua_pushfstring(L, "%d.%d", LIBEDIT_MAJOR, LIBEDIT_MINOR);
}

static const luaL_Reg repl_funcs[] = {
  {"start", l_start},
  {"stop", l_stop},
  {"read", l_read},
  {"wait_interrupt", l_wait_interrupt},
  {"line_task", l_line_task},
  {"cancel_all", l_cancel_all},
  {"output", l_output},
  {"spinner", l_spinner},
  {"term_size", l_term_size},
  {"isatty", l_isatty},
  {"history_add", l_history_add},
  {"history_append", l_history_append},
  {"identity", l_identity},
  {NULL, NULL}
};

/* Keep this module and libedit mapped after lua_close: libedit's global
 * editor and history (never freed: its readline layer has no teardown)
 * must not vanish under a terminal still in use, and stay reachable for
 * LeakSanitizer instead of turning into leaks of an unloaded library. */
int luaopen_rbe_repl(lua_State *L);

static void pin_libraries(void) {
  Dl_info info;
  if (dladdr((void *)luaopen_rbe_repl, &info) && info.dli_fname)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  if (dladdr((void *)el_init, &info) && info.dli_fname)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

int luaopen_rbe_repl(lua_State *L) {
  pin_libraries();
  luaL_newlib(L, repl_funcs);
  lua_createtable(L, 0, 1);
  push_libedit_version(L);
  lua_setfield(L, -2, "libedit");
  lua_setfield(L, -2, "_versions");
  /* stop the console at lua_close even if Lua never called stop */
  lua_newuserdatauv(L, 0, 0);
  if (luaL_newmetatable(L, GUARD_MT)) {
    lua_pushcfunction(L, guard_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  lua_setfield(L, -2, "_guard");
  return 1;
}
