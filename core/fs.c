/* fs.c: the C half of rbe.fs, preloaded as "rbe.fs.core" (the public module
 * is lua/rbe/fs.lua, which adds lines, tail and list's sorting on top).
 * It binds plain synchronous POSIX calls: read, atomic write, append,
 * stat, exists, mkdir -p, list, remove (recursive without following
 * symlinks), tmpdir, and a read-only file handle "rbe.fs.file" that
 * fs.lines and fs.tail read through.  Blocking calls are a deliberate
 * choice: rbe.fs is for small local files (configs, journals, logs), where
 * a thread-pool round trip costs more than the syscall itself.  Nothing
 * here waits for time; fs.tail's waiting is Lua calling rbe.sleep.
 *
 * Ownership: a file handle owns its fd (and, for list, its DIR) and closes
 * it in close, __close and __gc, so a raise never leaks it.  Every other
 * function holds its fds only within the call and releases them before it
 * raises.  Failures of the outside world raise error objects of kind "fs"
 * with code = the errno name ("ENOENT"); misuse raises a plain error
 * naming the function. */
#include "aux.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#define FILE_MT "rbe.fs.file"
#define READ_CHUNK 65536

typedef struct {
  int fd;
  DIR *dir;
} fs_file;

/* ---- errors ---- */

/* Push an error object for errno `err`: "<what>: <strerror>", code =
 * errno name.  `what` names the operation and the path. */
static void push_errno(lua_State *L, int err, const char *fmt, va_list ap) {
  const char *what = lua_pushvfstring(L, fmt, ap);
  int retryable = err == EAGAIN || err == EINTR || err == EBUSY;
  rbe_error_push(L, "fs", retryable, "%s: %s", what, strerror(err));
  const char *name = strerrorname_np(err);
  rbe_error_code_str(L, name ? name : "EUNKNOWN");
  lua_remove(L, -2);
}

static int raise_errno(lua_State *L, int err, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  push_errno(L, err, fmt, ap);
  va_end(ap);
  return lua_error(L);
}

/* ---- argument helpers ---- */

static const char *check_path(lua_State *L, int idx, const char *fname) {
  size_t len;
  if (lua_type(L, idx) != LUA_TSTRING)
    luaL_error(L, "%s: path must be a string, got %s", fname,
               luaL_typename(L, idx));
  const char *p = lua_tolstring(L, idx, &len);
  if (len == 0) luaL_error(L, "%s: path is empty", fname);
  if (strlen(p) != len) luaL_error(L, "%s: path contains a NUL byte", fname);
  return p;
}

/* The string (or secret string) at idx, revealed; the revealed value is
 * pushed so it stays alive while the caller uses the pointer. */
static const char *check_data(lua_State *L, int idx, const char *fname,
                              size_t *len) {
  rbe_push_revealed(L, idx);
  if (lua_type(L, -1) != LUA_TSTRING)
    luaL_error(L, "%s: data must be a string, got %s", fname,
               luaL_typename(L, -1));
  return lua_tolstring(L, -1, len);
}

static void check_opts(lua_State *L, int idx, const char *fname,
                       const char *const known[]) {
  if (lua_isnoneornil(L, idx)) return;
  if (!lua_istable(L, idx))
    luaL_error(L, "%s: options must be a table, got %s", fname,
               luaL_typename(L, idx));
  rbe_check_known_fields(L, idx, fname, known);
}

/* Option `mode`: an octal string ("0644", "644", "0o644") or an integer
 * permission.  Lua has no octal literals, so `mode = 0644` is the decimal
 * 644; every integer above 0777 is refused to catch that mistake (setuid
 * and friends need the string form).  Returns -1 when absent. */
static int opt_mode(lua_State *L, int idx, const char *fname) {
  if (lua_isnoneornil(L, idx)) return -1;
  lua_getfield(L, idx, "mode");
  long mode = -1;
  if (lua_type(L, -1) == LUA_TSTRING) {
    const char *s = lua_tostring(L, -1);
    if (s[0] == '0' && (s[1] == 'o' || s[1] == 'O')) s += 2;
    size_t n = strlen(s);
    if (n == 0 || n > 4 || strspn(s, "01234567") != n)
      luaL_error(L, "%s: mode '%s' is not an octal permission like \"0644\"",
                 fname, lua_tostring(L, -1));
    mode = strtol(s, NULL, 8);
  } else if (lua_isinteger(L, -1)) {
    lua_Integer m = lua_tointeger(L, -1);
    if (m < 0 || m > 0777)
      luaL_error(L, "%s: mode %I is not a permission (Lua has no octal "
                 "literals: 0644 is the decimal 644; write mode = \"0644\" "
                 "or tonumber(\"644\", 8))", fname, m);
    mode = (long)m;
  } else if (!lua_isnil(L, -1)) {
    luaL_error(L, "%s: mode must be an octal string like \"0644\", got %s",
               fname, luaL_typename(L, -1));
  }
  lua_pop(L, 1);
  return (int)mode;
}

/* Scratch memory owned by Lua (collected, so a raise cannot leak it). */
static char *scratch(lua_State *L, size_t n) {
  return lua_newuserdatauv(L, n, 0);
}

/* ---- small syscall helpers (no Lua, errno preserved) ---- */

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* fsync the directory holding `path` so a rename or a new entry survives
 * a crash.  Filesystems that cannot sync a directory say EINVAL: fine. */
static int fsync_parent(const char *path) {
  const char *slash = strrchr(path, '/');
  char buf[4096];
  const char *dir = ".";
  if (slash == path) dir = "/";
  else if (slash) {
    size_t n = (size_t)(slash - path);
    if (n >= sizeof buf) { errno = ENAMETOOLONG; return -1; }
    memcpy(buf, path, n);
    buf[n] = 0;
    dir = buf;
  }
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -1;
  int r = fsync(fd);
  int e = errno;
  close(fd);
  if (r < 0 && e != EINVAL && e != ENOTSUP) { errno = e; return -1; }
  return 0;
}

static void random_suffix(char *out, size_t n) {
  static const char chars[] = "abcdefghijklmnopqrstuvwxyz0123456789";
  unsigned char rnd[16];
  if (n > sizeof rnd) n = sizeof rnd;
  if (uv_random(NULL, NULL, rnd, n, 0, NULL) != 0) {
    static unsigned long counter;
    unsigned long long x = uv_hrtime() ^ ((unsigned long long)getpid() << 32)
                           ^ (++counter * 0x9E3779B97F4A7C15ull);
    for (size_t i = 0; i < n; i++) { rnd[i] = (unsigned char)x; x >>= 5; }
  }
  for (size_t i = 0; i < n; i++) out[i] = chars[rnd[i] % (sizeof chars - 1)];
}

/* ---- stat tables ---- */

static const char *type_name(mode_t m) {
  if (S_ISREG(m)) return "file";
  if (S_ISDIR(m)) return "dir";
  if (S_ISLNK(m)) return "link";
  if (S_ISFIFO(m)) return "fifo";
  if (S_ISSOCK(m)) return "socket";
  if (S_ISCHR(m)) return "char";
  if (S_ISBLK(m)) return "block";
  return "unknown";
}

static double ts(struct timespec t) {
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void push_stat(lua_State *L, const struct stat *st) {
  lua_createtable(L, 0, 11);
  lua_pushstring(L, type_name(st->st_mode));
  lua_setfield(L, -2, "type");
  lua_pushinteger(L, (lua_Integer)st->st_size);
  lua_setfield(L, -2, "size");
  lua_pushinteger(L, (lua_Integer)(st->st_mode & 07777));
  lua_setfield(L, -2, "mode");
  lua_pushnumber(L, ts(st->st_mtim));
  lua_setfield(L, -2, "mtime");
  lua_pushnumber(L, ts(st->st_atim));
  lua_setfield(L, -2, "atime");
  lua_pushnumber(L, ts(st->st_ctim));
  lua_setfield(L, -2, "ctime");
  lua_pushinteger(L, (lua_Integer)st->st_ino);
  lua_setfield(L, -2, "ino");
  lua_pushinteger(L, (lua_Integer)st->st_dev);
  lua_setfield(L, -2, "dev");
  lua_pushinteger(L, (lua_Integer)st->st_nlink);
  lua_setfield(L, -2, "nlink");
  lua_pushinteger(L, (lua_Integer)st->st_uid);
  lua_setfield(L, -2, "uid");
  lua_pushinteger(L, (lua_Integer)st->st_gid);
  lua_setfield(L, -2, "gid");
}

/* ---- file handles ---- */

static void file_release(fs_file *f) {
  if (f->dir) closedir(f->dir);       /* also closes its fd */
  else if (f->fd >= 0) close(f->fd);
  f->dir = NULL;
  f->fd = -1;
}

/* Push a new closed handle; user value 1 is "<op> <path>" for messages. */
static fs_file *file_new(lua_State *L, const char *op, const char *path) {
  fs_file *f = lua_newuserdatauv(L, sizeof *f, 1);
  f->fd = -1;
  f->dir = NULL;
  luaL_setmetatable(L, FILE_MT);
  lua_pushfstring(L, "%s %s", op, path);
  lua_setiuservalue(L, -2, 1);
  return f;
}

/* Pushes the handle (for messages: "<op> <path>"); raises on failure. */
static fs_file *file_open(lua_State *L, const char *path, const char *op) {
  fs_file *f = file_new(L, op, path);
  int fd;
  do fd = open(path, O_RDONLY | O_CLOEXEC); while (fd < 0 && errno == EINTR);
  if (fd < 0) raise_errno(L, errno, "%s %s", op, path);
  f->fd = fd;
  return f;
}

static fs_file *check_file(lua_State *L, const char *fname) {
  fs_file *f = luaL_checkudata(L, 1, FILE_MT);
  if (f->fd < 0) luaL_error(L, "%s: file is closed", fname);
  return f;
}

/* The handle's "<op> <path>" label, for error messages. */
static const char *file_label(lua_State *L) {
  lua_getiuservalue(L, 1, 1);
  return lua_tostring(L, -1);
}

/* core.open(path[, op]) -> file: a read-only handle; op names the public
 * function in error messages (default "fs.open"). */
static int fs_open(lua_State *L) {
  const char *op = luaL_optstring(L, 2, "fs.open");
  const char *path = check_path(L, 1, op);
  file_open(L, path, op);
  return 1;
}

/* file:read(n[, offset]) -> string, "" at the end of the file.  One
 * read(2) (pread at offset when given), so it may return less than n. */
static int file_read(lua_State *L) {
  fs_file *f = check_file(L, "file:read");
  lua_Integer n = luaL_checkinteger(L, 2);
  lua_Integer off = luaL_optinteger(L, 3, -1);
  if (n <= 0) return luaL_error(L, "file:read: size must be positive");
  if (lua_gettop(L) >= 3 && !lua_isnil(L, 3) && off < 0)
    return luaL_error(L, "file:read: offset must not be negative");
  luaL_Buffer b;
  char *p = luaL_buffinitsize(L, &b, (size_t)n);
  ssize_t r;
  do r = off >= 0 ? pread(f->fd, p, (size_t)n, (off_t)off)
                  : read(f->fd, p, (size_t)n);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    int e = errno;
    return raise_errno(L, e, "%s (read)", file_label(L));
  }
  luaL_pushresultsize(&b, (size_t)r);
  return 1;
}

/* file:stat() -> stat table of the open file (fstat) */
static int file_stat(lua_State *L) {
  fs_file *f = check_file(L, "file:stat");
  struct stat st;
  if (fstat(f->fd, &st) < 0)
    return raise_errno(L, errno, "%s (fstat)", file_label(L));
  push_stat(L, &st);
  return 1;
}

/* file:close() -> nothing; closing twice is fine (also __close, __gc) */
static int file_close(lua_State *L) {
  fs_file *f = luaL_checkudata(L, 1, FILE_MT);
  file_release(f);
  return 0;
}

static int file_tostring(lua_State *L) {
  fs_file *f = luaL_checkudata(L, 1, FILE_MT);
  lua_getiuservalue(L, 1, 1);
  lua_pushfstring(L, "rbe.fs.file (%s%s)", lua_tostring(L, -1),
                  f->fd < 0 ? ", closed" : "");
  return 1;
}

/* ---- whole-file operations ---- */

/* fs.read(path) -> string (the whole file, binary-safe) */
static int fs_read(lua_State *L) {
  const char *path = check_path(L, 1, "fs.read");
  lua_settop(L, 1);
  fs_file *f = file_open(L, path, "fs.read");
  struct stat st;
  size_t chunk = READ_CHUNK;
  if (fstat(f->fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0)
    chunk = (size_t)st.st_size + 1;   /* one read, then one to see EOF */
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (;;) {
    char *p = luaL_prepbuffsize(&b, chunk);
    ssize_t r = read(f->fd, p, chunk);
    if (r < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      file_release(f);
      return raise_errno(L, e, "fs.read %s", path);
    }
    if (r == 0) break;
    luaL_addsize(&b, (size_t)r);
    chunk = READ_CHUNK;
  }
  file_release(f);
  luaL_pushresult(&b);
  return 1;
}

/* fs.write(path, data[, {mode}]) -> nothing
 * Atomic: data goes to a temp file in the same directory, which is
 * fsync'd, renamed over path, and the directory fsync'd.  Without `mode`
 * an existing file keeps its permissions (and owner, when we may), a new
 * one gets 0666 minus the umask.  A symlink at path is followed: its
 * target is replaced and the link stays. */
static int fs_write(lua_State *L) {
  static const char *const known[] = {"mode", NULL};
  const char *path = check_path(L, 1, "fs.write");
  lua_settop(L, 3);
  size_t len;
  const char *data = check_data(L, 2, "fs.write", &len);
  check_opts(L, 3, "fs.write", known);
  int mode = opt_mode(L, 3, "fs.write");
  const char *target = path;
  struct stat st;
  if (lstat(path, &st) == 0 && S_ISLNK(st.st_mode)) {
    char *real = realpath(path, NULL);
    if (!real)
      return raise_errno(L, errno, "fs.write %s (resolving symlink)", path);
    lua_pushstring(L, real);
    free(real);
    target = lua_tostring(L, -1);
  }
  size_t tlen = strlen(target);
  char *tmp = scratch(L, tlen + 32);
  const char *slash = strrchr(target, '/');
  size_t dlen = slash ? (size_t)(slash - target) + 1 : 0;
  size_t blen = tlen - dlen;
  if (blen > 200) blen = 200;   /* stay under NAME_MAX with the suffix */
  /* "<dir>/.<base>.tmp-<8 random characters>" next to the target */
  memcpy(tmp, target, dlen);
  tmp[dlen] = '.';
  memcpy(tmp + dlen + 1, target + dlen, blen);
  char *suffix = tmp + dlen + 1 + blen;
  memcpy(suffix, ".tmp-", 5);
  suffix += 5;
  suffix[8] = 0;

  /* from here on: syscalls only; errors are collected and raised last */
  int fd = -1, err = 0;
  const char *step = "creating temp file";
  for (int tries = 0; tries < 100; tries++) {
    random_suffix(suffix, 8);
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0 || errno != EEXIST) break;
  }
  if (fd < 0) { err = errno; goto cleanup; }
  struct stat old;
  int have_old = stat(target, &old) == 0 && S_ISREG(old.st_mode);
  if (mode >= 0 || have_old) {
    step = "chmod temp file";
    if (fchmod(fd, mode >= 0 ? (mode_t)mode : old.st_mode & 07777) < 0) {
      err = errno;
      goto cleanup;
    }
  }
  if (have_old && (old.st_uid != geteuid() || old.st_gid != getegid())) {
    /* keep the owner when allowed (root); otherwise the file is ours */
    if (fchown(fd, old.st_uid, old.st_gid) < 0) { /* not permitted: fine */ }
  }
  step = "write";
  if (write_all(fd, data, len) < 0) { err = errno; goto cleanup; }
  step = "fsync";
  if (fsync(fd) < 0) { err = errno; goto cleanup; }
  step = "close";
  int r = close(fd);
  fd = -1;
  if (r < 0) { err = errno; goto cleanup; }
  step = "rename";
  if (rename(tmp, target) < 0) { err = errno; goto cleanup; }
  tmp = NULL;   /* renamed: nothing to clean up */
  step = "fsync directory";
  if (fsync_parent(target) < 0) err = errno;
cleanup:
  if (fd >= 0) close(fd);
  if (err && tmp) unlink(tmp);
  if (err) return raise_errno(L, err, "fs.write %s (%s)", path, step);
  return 0;
}

/* fs.append(path, data[, {fsync, mode}]) -> nothing
 * O_APPEND, creating the file if needed (mode as for fs.write).  With
 * fsync = true the data is on disk when it returns, and so is the file's
 * directory entry when the call created it (a journal relies on both). */
static int fs_append(lua_State *L) {
  static const char *const known[] = {"fsync", "mode", NULL};
  const char *path = check_path(L, 1, "fs.append");
  lua_settop(L, 3);
  size_t len;
  const char *data = check_data(L, 2, "fs.append", &len);
  check_opts(L, 3, "fs.append", known);
  int mode = opt_mode(L, 3, "fs.append");
  int sync = rbe_opt_bool_field(L, 3, "fsync", 0);

  /* from here on: syscalls only; errors are collected and raised last */
  int fd = -1, err = 0, created = 0;
  const char *step = "open";
  for (int tries = 0; fd < 0 && tries < 100; tries++) {
    fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd >= 0 || errno != ENOENT) break;
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_EXCL | O_CLOEXEC,
              0666);
    if (fd >= 0) created = 1;
    else if (errno != EEXIST) break;   /* EEXIST: lost a race, reopen */
  }
  if (fd < 0) { err = errno; goto cleanup; }
  if (created && mode >= 0) {
    step = "chmod";
    if (fchmod(fd, (mode_t)mode) < 0) { err = errno; goto cleanup; }
  }
  step = "write";
  if (write_all(fd, data, len) < 0) { err = errno; goto cleanup; }
  if (sync) {
    /* fdatasync: the data and the new size reach the disk; the timestamps
     * are not worth a second flush at every journal step boundary */
    step = "fsync";
    if (fdatasync(fd) < 0) { err = errno; goto cleanup; }
    step = "fsync directory";
    if (created && fsync_parent(path) < 0) { err = errno; goto cleanup; }
  }
  step = "close";
  int r = close(fd);
  fd = -1;
  if (r < 0) err = errno;
cleanup:
  if (fd >= 0) close(fd);
  if (err) return raise_errno(L, err, "fs.append %s (%s)", path, step);
  return 0;
}

/* fs.stat(path[, {follow}]) -> {type, size, mode, mtime, ...} or nil when
 * nothing is there.  Follows symlinks unless follow = false, which
 * reports a link itself (type "link"). */
static int fs_stat(lua_State *L) {
  static const char *const known[] = {"follow", NULL};
  const char *path = check_path(L, 1, "fs.stat");
  check_opts(L, 2, "fs.stat", known);
  int follow = rbe_opt_bool_field(L, 2, "follow", 1);
  struct stat st;
  if ((follow ? stat(path, &st) : lstat(path, &st)) < 0) {
    if (errno == ENOENT || errno == ENOTDIR) {
      lua_pushnil(L);
      return 1;
    }
    return raise_errno(L, errno, "fs.stat %s", path);
  }
  push_stat(L, &st);
  return 1;
}

/* fs.exists(path) -> boolean (follows symlinks, like test -e); raises
 * when it cannot tell, e.g. EACCES on a parent directory. */
/* fs.chmod(path, mode) -> nothing; mode as for write ("0600") */
static int fs_chmod(lua_State *L) {
  const char *path = check_path(L, 1, "fs.chmod");
  lua_settop(L, 2);
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, 2);
  lua_setfield(L, -2, "mode");
  int mode = opt_mode(L, 3, "fs.chmod");
  if (mode < 0) return luaL_error(L, "fs.chmod: mode expected");
  if (chmod(path, (mode_t)mode) != 0)
    return raise_errno(L, errno, "fs.chmod %s", path);
  return 0;
}

static int fs_exists(lua_State *L) {
  const char *path = check_path(L, 1, "fs.exists");
  struct stat st;
  if (stat(path, &st) == 0) lua_pushboolean(L, 1);
  else if (errno == ENOENT || errno == ENOTDIR) lua_pushboolean(L, 0);
  else return raise_errno(L, errno, "fs.exists %s", path);
  return 1;
}

static int is_dir(const char *p) {
  struct stat st;
  return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* fs.mkdir(path[, {mode}]) -> nothing
 * Like mkdir -p: creates missing parents, and an existing directory is
 * fine.  `mode` is applied exactly to the last directory when this call
 * creates it (like mkdir -p -m); the others get 0777 minus the umask. */
static int fs_mkdir(lua_State *L) {
  static const char *const known[] = {"mode", NULL};
  const char *path = check_path(L, 1, "fs.mkdir");
  check_opts(L, 2, "fs.mkdir", known);
  int mode = opt_mode(L, 2, "fs.mkdir");
  size_t n = strlen(path);
  char *buf = scratch(L, n + 1);
  memcpy(buf, path, n + 1);
  while (n > 1 && buf[n - 1] == '/') buf[--n] = 0;

  /* from here on: syscalls only; errors are collected and raised last */
  int err = 0;
  for (char *p = buf + 1; *p; p++) {
    if (*p != '/' || p[-1] == '/') continue;
    *p = 0;
    /* an existing directory may also answer EACCES or EROFS: check */
    if (mkdir(buf, 0777) < 0) {
      int e = errno;
      if (!is_dir(buf)) {
        err = e == EEXIST ? ENOTDIR : e;
        break;
      }
    }
    *p = '/';
  }
  if (!err) {
    if (mkdir(buf, mode >= 0 ? (mode_t)mode : 0777) == 0) {
      if (mode >= 0 && chmod(buf, (mode_t)mode) < 0) err = errno;
    } else {
      int e = errno;
      if (!is_dir(buf)) err = e;
    }
  }
  if (err) {
    if (strcmp(buf, path) == 0)
      return raise_errno(L, err, "fs.mkdir %s", path);
    return raise_errno(L, err, "fs.mkdir %s (at %s)", path, buf);
  }
  return 0;
}

/* core.list(dir) -> array of names, unsorted, without . and .. */
static int fs_list(lua_State *L) {
  const char *path = check_path(L, 1, "fs.list");
  lua_settop(L, 1);
  fs_file *f = file_new(L, "fs.list", path);   /* owns the DIR */
  f->dir = opendir(path);
  if (!f->dir) return raise_errno(L, errno, "fs.list %s", path);
  f->fd = dirfd(f->dir);
  lua_newtable(L);
  lua_Integer i = 0;
  for (;;) {
    errno = 0;
    struct dirent *de = readdir(f->dir);
    if (!de) {
      int e = errno;
      file_release(f);
      if (e) return raise_errno(L, e, "fs.list %s", path);
      break;
    }
    const char *nm = de->d_name;
    if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0)))
      continue;
    lua_pushstring(L, nm);
    lua_rawseti(L, -2, ++i);
  }
  return 1;
}

/* ---- remove ---- */

typedef struct {
  int err;
  char *where;   /* malloc'd path of the entry that failed */
} rm_ctx;

static int rm_fail(rm_ctx *c, int err, const char *path) {
  c->err = err;
  c->where = strdup(path);
  return -1;
}

/* Remove `name` inside the directory dfd (path is its full name, for
 * messages), depth first, never following a symlink: a link is removed,
 * not what it points to.  Entries that vanish meanwhile are fine. */
static int rm_tree(int dfd, const char *name, const char *path, rm_ctx *c) {
  struct stat st;
  if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
    return errno == ENOENT ? 0 : rm_fail(c, errno, path);
  if (!S_ISDIR(st.st_mode)) {
    if (unlinkat(dfd, name, 0) < 0 && errno != ENOENT)
      return rm_fail(c, errno, path);
    return 0;
  }
  int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return rm_fail(c, errno, path);
  DIR *d = fdopendir(fd);
  if (!d) {
    int e = errno;
    close(fd);
    return rm_fail(c, e, path);
  }
  int rc = 0;
  size_t plen = strlen(path);
  for (;;) {
    errno = 0;
    struct dirent *de = readdir(d);
    if (!de) {
      if (errno) rc = rm_fail(c, errno, path);
      break;
    }
    const char *nm = de->d_name;
    if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0)))
      continue;
    size_t nlen = strlen(nm);
    char *sub = malloc(plen + nlen + 2);
    if (!sub) { rc = rm_fail(c, ENOMEM, path); break; }
    memcpy(sub, path, plen);
    sub[plen] = '/';
    memcpy(sub + plen + 1, nm, nlen + 1);
    rc = rm_tree(dirfd(d), nm, sub, c);
    free(sub);
    if (rc) break;
  }
  closedir(d);
  if (rc) return rc;
  if (unlinkat(dfd, name, AT_REMOVEDIR) < 0 && errno != ENOENT)
    return rm_fail(c, errno, path);
  return 0;
}

/* "/", "//", ".", "..", "x/.." and the like: never removed recursively */
static int dangerous_root(const char *p) {
  if (strspn(p, "/") == strlen(p)) return 1;
  size_t n = strlen(p);
  while (n > 1 && p[n - 1] == '/') n--;
  size_t b = n;
  while (b > 0 && p[b - 1] != '/') b--;
  return (n - b == 1 && p[b] == '.') ||
         (n - b == 2 && p[b] == '.' && p[b + 1] == '.');
}

/* fs.remove(path[, {recursive, missing_ok}]) -> true, or false when path
 * was missing and missing_ok is set.  Without recursive: a file, link or
 * empty directory.  Recursive removal never follows symlinks and refuses
 * "/", "." and "..". */
static int fs_remove(lua_State *L) {
  static const char *const known[] = {"recursive", "missing_ok", NULL};
  const char *path = check_path(L, 1, "fs.remove");
  check_opts(L, 2, "fs.remove", known);
  int recursive = rbe_opt_bool_field(L, 2, "recursive", 0);
  int missing_ok = rbe_opt_bool_field(L, 2, "missing_ok", 0);
  if (recursive && dangerous_root(path))
    return luaL_error(L, "fs.remove: refusing to remove '%s' recursively",
                      path);
  struct stat st;
  if (lstat(path, &st) < 0) {
    if (errno == ENOENT && missing_ok) {
      lua_pushboolean(L, 0);
      return 1;
    }
    return raise_errno(L, errno, "fs.remove %s", path);
  }
  if (!recursive || !S_ISDIR(st.st_mode)) {
    if ((S_ISDIR(st.st_mode) ? rmdir(path) : unlink(path)) < 0) {
      if (errno == ENOENT && missing_ok) {
        lua_pushboolean(L, 0);
        return 1;
      }
      return raise_errno(L, errno, "fs.remove %s", path);
    }
    lua_pushboolean(L, 1);
    return 1;
  }
  rm_ctx c = {0, NULL};
  if (rm_tree(AT_FDCWD, path, path, &c) < 0) {
    /* stack: the message is built before the malloc'd path is freed */
    if (c.where && strcmp(c.where, path) != 0)
      lua_pushfstring(L, "fs.remove %s (at %s)", path, c.where);
    else
      lua_pushfstring(L, "fs.remove %s", path);
    free(c.where);
    return raise_errno(L, c.err, "%s", lua_tostring(L, -1));
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* fs.tmpdir([prefix]) -> path of a new private (0700) directory.  The
 * prefix (default "rbe-") goes in $TMPDIR (or /tmp); a prefix containing
 * a slash is a path prefix of its own, e.g. "/var/tmp/rbe-". */
static int fs_tmpdir(lua_State *L) {
  const char *prefix = "rbe-";
  if (!lua_isnoneornil(L, 1)) {
    size_t len;
    if (lua_type(L, 1) != LUA_TSTRING)
      return luaL_error(L, "fs.tmpdir: prefix must be a string, got %s",
                        luaL_typename(L, 1));
    prefix = lua_tolstring(L, 1, &len);
    if (strlen(prefix) != len)
      return luaL_error(L, "fs.tmpdir: prefix contains a NUL byte");
  }
  /* mkdtemp(3) replaces the template's last six characters */
  static const char template_tail[] = {'X', 'X', 'X', 'X', 'X', 'X', 0};
  char base[4096];
  size_t blen = sizeof base;
  if (strchr(prefix, '/')) lua_pushfstring(L, "%s%s", prefix, template_tail);
  else {
    int r = uv_os_tmpdir(base, &blen);
    lua_pushfstring(L, "%s/%s%s", r == 0 ? base : "/tmp", prefix, template_tail);
  }
  size_t n;
  const char *tpl = lua_tolstring(L, -1, &n);
  char *buf = scratch(L, n + 1);
  memcpy(buf, tpl, n + 1);
  if (!mkdtemp(buf))
    return raise_errno(L, errno, "fs.tmpdir %s", tpl);
  lua_pushstring(L, buf);
  return 1;
}

static const luaL_Reg file_methods[] = {
  {"read", file_read},
  {"stat", file_stat},
  {"close", file_close},
  {NULL, NULL}
};

static const luaL_Reg fs_funcs[] = {
  {"read", fs_read},
  {"write", fs_write},
  {"append", fs_append},
  {"stat", fs_stat},
  {"exists", fs_exists},
  {"chmod", fs_chmod},
  {"mkdir", fs_mkdir},
  {"list", fs_list},
  {"remove", fs_remove},
  {"tmpdir", fs_tmpdir},
  {"open", fs_open},
  {NULL, NULL}
};

int luaopen_rbe_fs(lua_State *L) {
  if (luaL_newmetatable(L, FILE_MT)) {
    luaL_newlib(L, file_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, file_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, file_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, file_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  luaL_newlib(L, fs_funcs);
  return 1;
}
