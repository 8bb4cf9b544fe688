/* main.c: the rbe executable.  Creates the Lua state and the libuv loop,
 * preloads the C modules, points package.path at rbe's own Lua library
 * (found from the executable's path, or RBE_PATH), runs the CLI
 * (lua/rbe/cli.lua) as the main task and turns its outcome into the exit
 * code: 0 done, 1 failed, 2 usage error, 130 interrupted. */
#include "aux.h"
#include "task.h"

#include <lualib.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int luaopen_cjson(lua_State *L);
int luaopen_rbe_timer(lua_State *L);
int luaopen_rbe_proc(lua_State *L);
int luaopen_rbe_fs(lua_State *L);
int luaopen_rbe_sys(lua_State *L);
void rbe_proc_kill_all(int sig);
void rbe_versions_push(lua_State *L);

#ifndef RBE_VERSION
#define RBE_VERSION "0.1.0"
#endif
#ifndef RBE_SOURCE_DIR
#define RBE_SOURCE_DIR ""
#endif

static volatile sig_atomic_t nsignals;
static pthread_t main_thread;
static int got_signal;
static uv_async_t sig_async;

static void on_signal(int sig) {
  rbe_nsignals++;
  if (++nsignals >= 2) {
    /* second Ctrl-C: leave now, taking the children with us */
    rbe_proc_kill_all(SIGKILL);
    _exit(130);
  }
  got_signal = sig;
  uv_async_send(&sig_async);
  /* only the loop thread may touch Lua; a signal delivered to a libuv
   * threadpool thread still reaches the loop through the async handle */
  if (pthread_equal(pthread_self(), main_thread)) rbe_sched_interrupt_running();
}

static void sig_async_cb(uv_async_t *h) {
  (void)h;
  rbe_sched_cancel_all(got_signal == SIGTERM ? "terminated (SIGTERM)"
                       : got_signal == SIGHUP ? "hung up (SIGHUP)"
                                              : "interrupted (Ctrl-C)", 1);
}

static void install_signals(void) {
  struct sigaction sa;
  main_thread = pthread_self();
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGHUP, &sa, NULL);   /* a dropped SSH session unwinds too */
  signal(SIGPIPE, SIG_IGN);
}

static int file_exists(const char *p) { return access(p, R_OK) == 0; }
static int bytecode_searcher(lua_State *L);

/* The directory of the rbe executable into buf; 0, or -1 if unknown. */
static int exe_dir(char *buf, size_t size) {
  size_t n = size;
  if (uv_exepath(buf, &n) != 0) return -1;
  char *slash = strrchr(buf, '/');
  if (!slash) return -1;
  *slash = 0;
  return 0;
}

/* Find the directory holding lua/rbe/init.lua: $RBE_PATH, then
 * <exe>/../share/rbe (installed and build tree), then the source tree. */
static void push_root(lua_State *L) {
  const char *env = getenv("RBE_PATH");
  if (env && *env) { lua_pushstring(L, env); return; }
  char exe[4096];
  if (exe_dir(exe, sizeof exe) == 0) {
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/../share/rbe/lua/rbe/init.lua", exe);
    if (file_exists(probe)) {
      lua_pushfstring(L, "%s/../share/rbe", exe);
      return;
    }
    snprintf(probe, sizeof probe, "%s/../lua/rbe/init.lua", exe);
    if (file_exists(probe)) {
      lua_pushfstring(L, "%s/..", exe);
      return;
    }
  }
  lua_pushstring(L, RBE_SOURCE_DIR);
}

static void setup_paths(lua_State *L) {
  const char *use_env = getenv("RBE_USE_LUA_PATH");
  int keep = use_env && *use_env && strcmp(use_env, "0") != 0;
  lua_getglobal(L, "package");
  push_root(L);
  const char *root = lua_tostring(L, -1);
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, "rbe_root");
  const char *lp = keep && getenv("LUA_PATH_5_4") ? getenv("LUA_PATH_5_4")
                 : keep && getenv("LUA_PATH") ? getenv("LUA_PATH")
                 : LUA_PATH_DEFAULT;
  const char *lc = keep && getenv("LUA_CPATH_5_4") ? getenv("LUA_CPATH_5_4")
                 : keep && getenv("LUA_CPATH") ? getenv("LUA_CPATH")
                 : LUA_CPATH_DEFAULT;
  lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua;%s/modules/?.lua;%s",
                  root, root, root, lp);
  lua_setfield(L, -3, "path");
  lua_pushstring(L, lc);
  lua_setfield(L, -3, "cpath");
  /* stack: package, root -> insert the bytecode searcher at position 2 */
  lua_getfield(L, -2, "searchers");
  lua_pushvalue(L, -2);
  lua_pushcclosure(L, bytecode_searcher, 1);
  for (int i = (int)luaL_len(L, -2); i >= 2; i--) {
    lua_rawgeti(L, -2, i);
    lua_rawseti(L, -3, i + 1);
  }
  lua_rawseti(L, -2, 2);
  lua_pop(L, 3);
}

/* package.searchers entry placed before the source searcher: load
 * <root>/luac/NAME.luac (compiled at build time, debug info kept) while it
 * is at least as new as <root>/lua/NAME.lua; parsing the library's source
 * at every start costs more than everything else rbe does to start. */
static int stat_mtime(const char *path, struct timespec *ts) {
  struct stat st;
  if (stat(path, &st) != 0) return -1;
  *ts = st.st_mtim;
  return 0;
}

/* one open and one read per module (luaL_loadfilex opens a binary chunk
 * twice); the chunk keeps the source's name for tracebacks */
static int load_bytecode(lua_State *L, const char *bc, const char *src) {
  int fd = open(bc, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return luaL_error(L, "cannot open %s: %s", bc, strerror(errno));
  struct stat st;
  char *buf = NULL;
  ssize_t got = -1;
  if (fstat(fd, &st) == 0 && (buf = malloc((size_t)st.st_size + 1)) != NULL) {
    size_t off = 0;
    while (off < (size_t)st.st_size) {
      ssize_t r = read(fd, buf + off, (size_t)st.st_size - off);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      off += (size_t)r;
    }
    got = (ssize_t)off;
  }
  int err = errno;
  close(fd);
  if (!buf || got != (ssize_t)st.st_size) {
    free(buf);
    return luaL_error(L, "cannot read %s: %s", bc, strerror(err ? err : EIO));
  }
  lua_pushfstring(L, "@%s", src);
  int rc = luaL_loadbufferx(L, buf, (size_t)got, lua_tostring(L, -1), "b");
  free(buf);
  lua_remove(L, -2);
  return rc;
}

static int bytecode_searcher(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  const char *root = lua_tostring(L, lua_upvalueindex(1));
  char mod[512];
  size_t n = strlen(name);
  if (n >= sizeof mod) return 0;
  for (size_t i = 0; i <= n; i++) mod[i] = name[i] == '.' ? '/' : name[i];
  static const char *const forms[][2] = {
    {"%s/luac/%s.luac", "%s/lua/%s.lua"},
    {"%s/luac/%s/init.luac", "%s/lua/%s/init.lua"},
  };
  for (int i = 0; i < 2; i++) {
    char bc[4096], src[4096];
    struct timespec tb, ts;
    snprintf(bc, sizeof bc, forms[i][0], root, mod);
    if (stat_mtime(bc, &tb) != 0) continue;
    snprintf(src, sizeof src, forms[i][1], root, mod);
    if (stat_mtime(src, &ts) == 0 &&
        (ts.tv_sec > tb.tv_sec ||
         (ts.tv_sec == tb.tv_sec && ts.tv_nsec > tb.tv_nsec)))
      continue;                          /* edited since the build */
    if (load_bytecode(L, bc, src) != LUA_OK) return lua_error(L);
    lua_pushstring(L, src);
    return 2;
  }
  lua_pushfstring(L, "no bytecode for '%s' in %s/luac", name, root);
  return 1;
}

/* The directory of rbe's loadable C modules: $RBE_LIBDIR, else
 * <exe>/../lib/rbe (the build tree and the installed layout alike). */
static void push_libdir(lua_State *L) {
  const char *env = getenv("RBE_LIBDIR");
  if (env && *env) { lua_pushstring(L, env); return; }
  char exe[4096];
  if (exe_dir(exe, sizeof exe) == 0) {
    lua_pushfstring(L, "%s/../lib/rbe", exe);
    return;
  }
  lua_pushliteral(L, ".");
}

/* package.preload entry: open <libdir>/<file>.so, call luaopen_rbe_<file>.
 * The library is opened RTLD_NODELETE: it stays mapped after lua_close,
 * when main's last uv_run still calls the close callbacks of its handles. */
static int lazy_open(lua_State *L) {
  const char *file = lua_tostring(L, lua_upvalueindex(1));
  push_libdir(L);
  const char *path = lua_pushfstring(L, "%s/%s.so", lua_tostring(L, -1), file);
  void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (!lib)
    return luaL_error(L, "cannot load rbe's %s module (RBE_LIBDIR): %s", file,
                      dlerror());
  lua_pushfstring(L, "luaopen_rbe_%s", file);
  lua_CFunction open = (lua_CFunction)dlsym(lib, lua_tostring(L, -1));
  if (!open)
    return luaL_error(L, "%s has no %s", path, lua_tostring(L, -1));
  lua_pushcfunction(L, open);
  lua_pushvalue(L, 1);
  lua_call(L, 1, 1);
  return 1;
}

static void preload_lazy(lua_State *L, const char *name, const char *file) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushstring(L, file);
  lua_pushcclosure(L, lazy_open, 1);
  lua_setfield(L, -2, name);
  lua_pop(L, 1);
}

static void preload(lua_State *L, const char *name, lua_CFunction f) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, f);
  lua_setfield(L, -2, name);
  lua_pop(L, 1);
}

static int l_versions(lua_State *L) {
  rbe_versions_push(L);
  return 1;
}

static int msgh(lua_State *L) {
  luaL_traceback(L, L, luaL_tolstring(L, 1, NULL), 1);
  return 1;
}

/* Print a failed main task's error: message, then its traceback. */
static void report_error(lua_State *L) {
  /* stack: err */
  if (rbe_is_error(L, -1)) {
    lua_getfield(L, -1, "kind");
    lua_getfield(L, -2, "message");
    const char *kind = lua_tostring(L, -2);
    const char *msg = luaL_tolstring(L, -1, NULL);
    if (kind && strcmp(kind, "lua") == 0) fprintf(stderr, "rbe: %s\n", msg);
    else {
      lua_pushvalue(L, -4);
      lua_pushnil(L);
      lua_setfield(L, -2, "traceback");   /* printed below, not twice */
      fprintf(stderr, "rbe: %s\n", luaL_tolstring(L, -1, NULL));
      lua_pop(L, 2);
    }
    lua_pop(L, 3);
    lua_getfield(L, -1, "traceback");
    if (lua_isstring(L, -1) && (!kind || strcmp(kind, "cancelled") != 0))
      fprintf(stderr, "%s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
  } else {
    fprintf(stderr, "rbe: %s\n", luaL_tolstring(L, -1, NULL));
    lua_pop(L, 1);
  }
}

static void walk_close_cb(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

int main(int argc, char **argv) {
  uv_loop_t *loop = uv_default_loop();
  lua_State *L = luaL_newstate();
  if (!L) { fprintf(stderr, "rbe: cannot create Lua state\n"); return 2; }
  luaL_openlibs(L);
  preload(L, "cjson", luaopen_cjson);
  preload(L, "rbe.core", luaopen_rbe_core);
  preload(L, "rbe.aux", luaopen_rbe_aux);
  preload(L, "rbe.timer", luaopen_rbe_timer);
  preload(L, "rbe.proc.core", luaopen_rbe_proc);
  preload(L, "rbe.fs.core", luaopen_rbe_fs);
  preload(L, "rbe.sys", luaopen_rbe_sys);
  /* the heavy clients are loadable modules (lib/rbe/<name>.so), opened on
   * first require: starting rbe does not pay for libpq, libcurl, hiredis
   * and libedit (bench/startup.lua measures the difference) */
  preload_lazy(L, "rbe.pg.core", "pg");
  preload_lazy(L, "rbe.http.core", "http");
  preload_lazy(L, "rbe.redis.core", "redis");
  preload_lazy(L, "rbe.repl.core", "repl");
  setup_paths(L);
  rbe_sched_init(L, loop);
  uv_async_init(loop, &sig_async, sig_async_cb);
  uv_unref((uv_handle_t *)&sig_async);
  install_signals();

  /* os.exit inside a task unwinds every task first */
  lua_getglobal(L, "os");
  luaL_requiref(L, "rbe.core", luaopen_rbe_core, 0);
  lua_getfield(L, -1, "_exit");
  lua_setfield(L, -3, "exit");
  lua_pushcfunction(L, l_versions);
  lua_setfield(L, -2, "versions");
  lua_pushliteral(L, RBE_VERSION);
  lua_setfield(L, -2, "version");
  lua_pop(L, 2);

  /* stack: msgh, require, "rbe.cli" */
  lua_pushcfunction(L, msgh);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "rbe.cli");
  if (lua_pcall(L, 1, 1, 1) != LUA_OK) {
    fprintf(stderr, "rbe: cannot load rbe's Lua library (package.rbe_root "
            "or RBE_PATH): %s\n", lua_tostring(L, -1));
    return 2;
  }
  lua_getfield(L, -1, "main");
  lua_createtable(L, argc, 0);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  rbe_task *main_task = rbe_task_spawn(L, 1);
  int main_ref = rbe_ref(L);
  lua_settop(L, 0);

  int stuck = rbe_sched_run();
  int code;
  lua_rawgeti(L, LUA_REGISTRYINDEX, main_ref);
  int outcome = rbe_task_outcome(L, -1, main_task);
  if (outcome) lua_remove(L, -2); else lua_pop(L, 1);
  if (outcome == 0) {
    lua_pushcfunction(L, msgh);
    lua_rawgeti(L, LUA_REGISTRYINDEX, main_ref);
    lua_getfield(L, -1, "result");
    lua_insert(L, -2);
    code = 0;
    if (lua_pcall(L, 1, 1, -3) == LUA_OK && lua_isinteger(L, -1))
      code = (int)lua_tointeger(L, -1);
    lua_settop(L, 0);
  } else {
    /* stack: err */
    int exit_req = rbe_sched_exit_code();
    if (exit_req >= 0) code = exit_req;
    else if (nsignals) code = 130;
    else {
      report_error(L);
      code = 1;
    }
    if (nsignals && exit_req < 0)
      fprintf(stderr, "rbe: %s\n", got_signal == SIGTERM ? "terminated"
                                                         : "interrupted");
    lua_settop(L, 0);
  }
  if (rbe_sched_exit_code() >= 0) code = rbe_sched_exit_code();
  else if (nsignals) code = 130;
  if (stuck) code = code ? code : 1;
  rbe_unref(L, &main_ref);
  fflush(stdout);

  /* finalizers close what is still open (children are killed) */
  lua_close(L);
  rbe_sched_close();
  uv_close((uv_handle_t *)&sig_async, NULL);
  uv_walk(loop, walk_close_cb, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  uv_loop_close(loop);
  return code;
}
