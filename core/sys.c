/* sys.c: small system facts and tools the playbook engine needs: SHA-256
 * (a playbook's hash in its journal), isatty, who/where (user, host, pid),
 * an exclusive lock file released by the kernel when the process dies
 * (flock), and rbe.read_line, an asynchronous read of one line from stdin
 * so a manual step's confirmation does not stop the loop. */
#include "aux.h"
#include "task.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- SHA-256 (FIPS 180-4) ---- */

typedef struct {
  uint32_t h[8];
  uint64_t len;
  unsigned char buf[64];
  size_t n;
} sha256_ctx;

static const uint32_t K[64] = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
  0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
  0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
  0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
  0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
  0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
  0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
  0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
  0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(sha256_ctx *c, const unsigned char *p) {
  uint32_t w[64], a, b, d, e, f, g, h, cc;
  for (int i = 0; i < 16; i++)
    w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
           (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
  for (int i = 16; i < 64; i++) {
    uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  a = c->h[0]; b = c->h[1]; cc = c->h[2]; d = c->h[3];
  e = c->h[4]; f = c->h[5]; g = c->h[6]; h = c->h[7];
  for (int i = 0; i < 64; i++) {
    uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) +
                  ((e & f) ^ (~e & g)) + K[i] + w[i];
    uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) +
                  ((a & b) ^ (a & cc) ^ (b & cc));
    h = g; g = f; f = e; e = d + t1;
    d = cc; cc = b; b = a; a = t1 + t2;
  }
  c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d;
  c->h[4] += e; c->h[5] += f; c->h[6] += g; c->h[7] += h;
}

static void sha256_init(sha256_ctx *c) {
  static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372,
                                 0xa54ff53a, 0x510e527f, 0x9b05688c,
                                 0x1f83d9ab, 0x5be0cd19};
  memcpy(c->h, iv, sizeof iv);
  c->len = 0;
  c->n = 0;
}

static void sha256_update(sha256_ctx *c, const unsigned char *p, size_t len) {
  c->len += len;
  while (len > 0) {
    size_t take = 64 - c->n < len ? 64 - c->n : len;
    memcpy(c->buf + c->n, p, take);
    c->n += take;
    p += take;
    len -= take;
    if (c->n == 64) { sha256_block(c, c->buf); c->n = 0; }
  }
}

static void sha256_final(sha256_ctx *c, unsigned char out[32]) {
  uint64_t bits = c->len * 8;
  unsigned char pad = 0x80, zero = 0, lenb[8];
  sha256_update(c, &pad, 1);
  while (c->n != 56) sha256_update(c, &zero, 1);
  for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)(bits >> (56 - 8 * i));
  sha256_update(c, lenb, 8);
  for (int i = 0; i < 8; i++) {
    out[4 * i] = (unsigned char)(c->h[i] >> 24);
    out[4 * i + 1] = (unsigned char)(c->h[i] >> 16);
    out[4 * i + 2] = (unsigned char)(c->h[i] >> 8);
    out[4 * i + 3] = (unsigned char)c->h[i];
  }
}

/* rbe.sha256(s) -> 64 lowercase hex digits */
static int l_sha256(lua_State *L) {
  size_t len;
  lua_settop(L, 1);
  rbe_push_revealed(L, 1);
  const char *s = luaL_checklstring(L, -1, &len);
  sha256_ctx c;
  unsigned char d[32];
  char hex[65];
  sha256_init(&c);
  sha256_update(&c, (const unsigned char *)s, len);
  sha256_final(&c, d);
  for (int i = 0; i < 32; i++) {
    static const char digits[] = "0123456789abcdef";
    hex[2 * i] = digits[d[i] >> 4];
    hex[2 * i + 1] = digits[d[i] & 15];
  }
  lua_pushlstring(L, hex, 64);
  return 1;
}

/* rbe.isatty(fd) -> boolean (0 stdin, 1 stdout, 2 stderr) */
static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)) == 1);
  return 1;
}

/* rbe.whoami() -> {user, uid, host, pid, cwd} */
static int l_whoami(lua_State *L) {
  char host[256];
  size_t n = sizeof host;
  uv_passwd_t pw;
  lua_createtable(L, 0, 4);
  if (uv_os_get_passwd(&pw) == 0) {
    lua_pushstring(L, pw.username);
    uv_os_free_passwd(&pw);
  } else {
    const char *u = getenv("USER");
    lua_pushstring(L, u ? u : "unknown");
  }
  lua_setfield(L, -2, "user");
  lua_pushinteger(L, (lua_Integer)getuid());
  lua_setfield(L, -2, "uid");
  if (uv_os_gethostname(host, &n) == 0) lua_pushstring(L, host);
  else lua_pushliteral(L, "unknown");
  lua_setfield(L, -2, "host");
  lua_pushinteger(L, (lua_Integer)uv_os_getpid());
  lua_setfield(L, -2, "pid");
  char cwd[4096];
  size_t cn = sizeof cwd;
  if (uv_cwd(cwd, &cn) == 0) {
    lua_pushstring(L, cwd);
    lua_setfield(L, -2, "cwd");
  }
  return 1;
}

/* ---- lock files ---- */

#define LOCK_MT "rbe.lock"

typedef struct { int fd; } lockfile;

/* rbe.lock(path[, info]) -> lock | nil, holder
 * Takes an exclusive flock on path (created 0600).  On success writes
 * `info` (a string, e.g. JSON of who holds it) into the file.  If another
 * process holds it, returns nil and the holder's info.  The kernel drops
 * the lock when this process dies, however it dies. */
static int l_lock(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  size_t ilen = 0;
  const char *info = luaL_optlstring(L, 2, "", &ilen);
  lockfile *lk = lua_newuserdatauv(L, sizeof *lk, 0);
  lk->fd = -1;
  luaL_setmetatable(L, LOCK_MT);
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0)
    return rbe_error_raise(L, "fs", strerrorname_np(errno), 0,
                           "rbe.lock %s: %s", path, strerror(errno));
  fchmod(fd, 0600);
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    char buf[4096];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    close(fd);
    if (err != EWOULDBLOCK)
      return rbe_error_raise(L, "fs", strerrorname_np(err), 0,
                             "rbe.lock %s: %s", path, strerror(err));
    lua_pushnil(L);
    lua_pushlstring(L, buf, n > 0 ? (size_t)n : 0);
    return 2;
  }
  lk->fd = fd;
  if (ftruncate(fd, 0) == 0 && ilen) {
    ssize_t w = pwrite(fd, info, ilen, 0);
    (void)w;
  }
  return 1;
}

/* lock:release() -> nothing; releasing twice is fine */
static int lock_release(lua_State *L) {
  lockfile *lk = luaL_checkudata(L, 1, LOCK_MT);
  if (lk->fd >= 0) {
    if (ftruncate(lk->fd, 0) != 0) { /* the lock goes anyway */ }
    close(lk->fd);
    lk->fd = -1;
  }
  return 0;
}

/* ---- rbe.read_line ---- */

typedef struct {
  uv_poll_t poll;
  rbe_wait *w;
  int done;
  char *line;
  size_t len, cap;
  int eof;
} line_req;

static struct {
  char buf[4096];
  size_t len;         /* bytes read past the last returned line */
} stdin_rest;

static void line_close_cb(uv_handle_t *h) {
  line_req *r = h->data;
  free(r->line);
  free(r);
  rbe_counts[RBE_COUNT_HANDLES]--;
}

static int line_push(lua_State *L, void *ud) {
  line_req *r = ud;
  if (L) {
    if (r->eof && r->len == 0) lua_pushnil(L);
    else lua_pushlstring(L, r->line ? r->line : "", r->len);
  }
  uv_close((uv_handle_t *)&r->poll, line_close_cb);
  return L ? 1 : 0;
}

static int line_append(line_req *r, const char *p, size_t n) {
  if (r->len + n + 1 > r->cap) {
    size_t cap = (r->len + n + 1) * 2;
    char *nl = realloc(r->line, cap);
    if (!nl) return -1;
    r->line = nl;
    r->cap = cap;
  }
  memcpy(r->line + r->len, p, n);
  r->len += n;
  return 0;
}

/* Take a complete line out of stdin_rest into r; 1 if one was there. */
static int take_line(line_req *r) {
  char *nl = memchr(stdin_rest.buf, '\n', stdin_rest.len);
  size_t n = nl ? (size_t)(nl - stdin_rest.buf) : stdin_rest.len;
  if (!nl && stdin_rest.len < sizeof stdin_rest.buf && !r->eof) {
    return 0;
  }
  line_append(r, stdin_rest.buf, n);
  size_t used = nl ? n + 1 : n;
  memmove(stdin_rest.buf, stdin_rest.buf + used, stdin_rest.len - used);
  stdin_rest.len -= used;
  return nl != NULL || r->eof;
}

static void line_poll_cb(uv_poll_t *h, int status, int events) {
  line_req *r = h->data;
  if (r->done) return;
  if (status >= 0) {
    ssize_t n = read(0, stdin_rest.buf + stdin_rest.len,
                     sizeof stdin_rest.buf - stdin_rest.len);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) r->eof = 1;
    else stdin_rest.len += (size_t)n;
  } else {
    r->eof = 1;
  }
  if (!take_line(r)) return;
  r->done = 1;
  uv_poll_stop(h);
  rbe_wait_done(r->w, line_push, r);
}

static void line_cancel(void *ud) {
  line_req *r = ud;
  r->done = 1;
  uv_poll_stop(&r->poll);
  uv_close((uv_handle_t *)&r->poll, line_close_cb);
}

/* rbe.read_line() -> the next line of stdin without its newline, or nil at
 * end of input  [yields]  The loop keeps running while it waits. */
static int l_read_line(lua_State *L) {
  rbe_wait *w = rbe_wait_new(L, "rbe.read_line");
  line_req *r = calloc(1, sizeof *r);
  if (!r) return luaL_error(L, "rbe.read_line: out of memory");
  r->w = w;
  if (take_line(r)) {
    /* a whole line was already buffered: still deliver through the loop */
    r->done = 1;
  }
  int err = uv_poll_init(rbe_loop(), &r->poll, 0);
  if (err < 0) {
    /* a regular file or /dev/null cannot be polled: read it directly */
    if (!r->done) {
      char c;
      ssize_t n;
      while ((n = read(0, &c, 1)) == 1 && c != '\n') line_append(r, &c, 1);
      if (n <= 0) r->eof = 1;
    }
    lua_settop(L, 0);
    if (r->eof && r->len == 0) lua_pushnil(L);
    else lua_pushlstring(L, r->line ? r->line : "", r->len);
    free(r->line);
    free(r);
    return 1;
  }
  rbe_counts[RBE_COUNT_HANDLES]++;
  r->poll.data = r;
  if (r->done) {
    rbe_wait_done(w, line_push, r);
  } else {
    uv_poll_start(&r->poll, UV_READABLE | UV_DISCONNECT, line_poll_cb);
  }
  return rbe_wait_yield(L, w, r->done ? NULL : line_cancel, r);
}

static const luaL_Reg lock_methods[] = {
  {"release", lock_release},
  {NULL, NULL}
};

static const luaL_Reg sys_funcs[] = {
  {"sha256", l_sha256},
  {"isatty", l_isatty},
  {"whoami", l_whoami},
  {"lock", l_lock},
  {"read_line", l_read_line},
  {NULL, NULL}
};

int luaopen_rbe_sys(lua_State *L) {
  if (luaL_newmetatable(L, LOCK_MT)) {
    luaL_newlib(L, lock_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, lock_release);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, lock_release);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  luaL_newlib(L, sys_funcs);
  return 1;
}
