/* aux.c: error objects, durations, option readers, rbe.null, secrets and
 * the debug counters.  Error objects are plain tables with the metatable
 * "rbe.error" so that Lua code can read and extend them; the metatable's
 * __tostring renders "kind: message (code)". */
#include "aux.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

long rbe_counts[RBE_COUNT_N];

static char null_key;   /* address used as rbe.null's registry key */

int rbe_ref(lua_State *L) {
  rbe_counts[RBE_COUNT_REFS]++;
  return luaL_ref(L, LUA_REGISTRYINDEX);
}

void rbe_unref(lua_State *L, int *ref) {
  if (*ref == LUA_NOREF || *ref == LUA_REFNIL) return;
  luaL_unref(L, LUA_REGISTRYINDEX, *ref);
  rbe_counts[RBE_COUNT_REFS]--;
  *ref = LUA_NOREF;
}

/* ---- error objects ---- */

static int error_tostring(lua_State *L) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  lua_getfield(L, 1, "kind");
  if (lua_type(L, -1) == LUA_TSTRING) {
    luaL_addvalue(&b);
    luaL_addstring(&b, ": ");
  } else lua_pop(L, 1);
  lua_getfield(L, 1, "message");
  luaL_tolstring(L, -1, NULL);  /* stack: err, [kind], message, str */
  lua_remove(L, -2);
  luaL_addvalue(&b);
  lua_getfield(L, 1, "code");
  if (!lua_isnil(L, -1) && lua_isstring(L, -1)) {
    luaL_addstring(&b, " (");
    luaL_addvalue(&b);
    luaL_addstring(&b, ")");
  } else lua_pop(L, 1);
  luaL_pushresult(&b);
  return 1;
}

static void push_error_mt(lua_State *L) {
  if (luaL_newmetatable(L, RBE_ERROR_MT)) {
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, "rbe.error");
    lua_setfield(L, -2, "__name");
  }
}

static void error_pushv(lua_State *L, const char *kind, int retryable,
                        const char *fmt, va_list ap) {
  lua_createtable(L, 0, 6);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
  lua_pushvfstring(L, fmt, ap);
  lua_setfield(L, -2, "message");
  lua_pushboolean(L, retryable);
  lua_setfield(L, -2, "retryable");
  push_error_mt(L);
  lua_setmetatable(L, -2);
}

void rbe_error_push(lua_State *L, const char *kind, int retryable,
                    const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  error_pushv(L, kind, retryable, fmt, ap);
  va_end(ap);
}

void rbe_error_code_str(lua_State *L, const char *code) {
  lua_pushstring(L, code);
  lua_setfield(L, -2, "code");
}

void rbe_error_code_int(lua_State *L, lua_Integer code) {
  lua_pushinteger(L, code);
  lua_setfield(L, -2, "code");
}

int rbe_error_raise(lua_State *L, const char *kind, const char *code,
                    int retryable, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  error_pushv(L, kind, retryable, fmt, ap);
  va_end(ap);
  if (code) rbe_error_code_str(L, code);
  return lua_error(L);
}

void rbe_error_push_uv(lua_State *L, const char *kind, int uverr,
                       const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  error_pushv(L, kind, 0, fmt, ap);
  va_end(ap);
  /* append libuv's description to the message */
  lua_getfield(L, -1, "message");
  lua_pushfstring(L, "%s: %s", lua_tostring(L, -1), uv_strerror(uverr));
  lua_setfield(L, -3, "message");
  lua_pop(L, 1);
  rbe_error_code_str(L, uv_err_name(uverr));
}

int rbe_is_error(lua_State *L, int idx) {
  if (!lua_getmetatable(L, idx)) return 0;
  luaL_getmetatable(L, RBE_ERROR_MT);
  int eq = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return eq;
}

/* rbe.error(kind, message[, fields]) -> error object (not raised) */
static int l_error_new(lua_State *L) {
  const char *kind = luaL_checkstring(L, 1);
  const char *msg = luaL_checkstring(L, 2);
  rbe_error_push(L, kind, 0, "%s", msg);
  if (lua_istable(L, 3)) {
    lua_pushnil(L);
    while (lua_next(L, 3)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_settable(L, -4);
    }
  }
  return 1;
}

/* rbe.is_error(v) -> boolean */
static int l_is_error(lua_State *L) {
  lua_pushboolean(L, rbe_is_error(L, 1));
  return 1;
}

/* ---- durations ---- */

int rbe_parse_duration(const char *s, double *out) {
  double total = 0;
  int parts = 0;
  while (*s == ' ') s++;
  if (!*s) return -1;
  while (*s) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || !isfinite(v) || v < 0) return -1;
    s = end;
    double unit;
    if (strncmp(s, "ms", 2) == 0) { unit = 0.001; s += 2; }
    else if (strncmp(s, "us", 2) == 0) { unit = 0.000001; s += 2; }
    else if (*s == 's') { unit = 1; s++; }
    else if (*s == 'm') { unit = 60; s++; }
    else if (*s == 'h') { unit = 3600; s++; }
    else if (*s == 'd') { unit = 86400; s++; }
    else return -1;
    total += v * unit;
    parts++;
    while (*s == ' ') s++;
  }
  *out = total;
  return parts ? 0 : -1;
}

double rbe_check_duration(lua_State *L, int idx, const char *what) {
  int t = lua_type(L, idx);
  if (t == LUA_TNUMBER) {
    double v = lua_tonumber(L, idx);
    if (!(v >= 0) || !isfinite(v))
      return luaL_error(L, "%s: duration must be a non-negative number of "
                        "seconds, got %f", what, v), 0;
    return v;
  }
  if (t == LUA_TSTRING) {
    double v;
    if (rbe_parse_duration(lua_tostring(L, idx), &v) == 0) return v;
    return luaL_error(L, "%s: bad duration '%s' (use seconds or a string "
                      "like \"250ms\", \"5s\", \"2m\", \"1h\")", what,
                      lua_tostring(L, idx)), 0;
  }
  return luaL_error(L, "%s: duration expected (number of seconds or "
                    "\"250ms\"/\"5s\"/\"2m\"/\"1h\"), got %s", what,
                    luaL_typename(L, idx)), 0;
}

double rbe_opt_duration_field(lua_State *L, int idx, const char *name,
                              double def) {
  if (lua_isnoneornil(L, idx)) return def;
  idx = lua_absindex(L, idx);
  lua_getfield(L, idx, name);
  double v = def;
  if (!lua_isnil(L, -1)) v = rbe_check_duration(L, -1, name);
  lua_pop(L, 1);
  return v;
}

unsigned long long rbe_duration_ms(double s) {
  if (s <= 0) return 0;
  double ms = ceil(s * 1000.0);
  if (ms > 9.0e15) ms = 9.0e15;
  return (unsigned long long)ms;
}

/* rbe.duration(d) -> seconds */
static int l_duration(lua_State *L) {
  lua_pushnumber(L, rbe_check_duration(L, 1, "rbe.duration"));
  return 1;
}

/* ---- option readers ---- */

int rbe_opt_bool_field(lua_State *L, int idx, const char *name, int def) {
  if (lua_isnoneornil(L, idx)) return def;
  lua_getfield(L, idx, name);
  int v = lua_isnil(L, -1) ? def : lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

lua_Integer rbe_opt_int_field(lua_State *L, int idx, const char *name,
                              lua_Integer def) {
  if (lua_isnoneornil(L, idx)) return def;
  lua_getfield(L, idx, name);
  lua_Integer v = def;
  if (!lua_isnil(L, -1)) {
    int ok;
    v = lua_tointegerx(L, -1, &ok);
    if (!ok) luaL_error(L, "option '%s' must be an integer", name);
  }
  lua_pop(L, 1);
  return v;
}

const char *rbe_opt_string_field(lua_State *L, int idx, const char *name,
                                 const char *def, size_t *len) {
  if (lua_isnoneornil(L, idx)) {
    if (len) *len = def ? strlen(def) : 0;
    return def;
  }
  lua_getfield(L, idx, name);
  const char *v = def;
  if (len) *len = def ? strlen(def) : 0;
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
      luaL_error(L, "option '%s' must be a string", name);
    v = lua_tolstring(L, -1, len);
  }
  /* the string stays alive: it is referenced by the options table */
  lua_pop(L, 1);
  return v;
}

void rbe_check_known_fields(lua_State *L, int idx, const char *fname,
                            const char *const known[]) {
  if (!lua_istable(L, idx)) return;
  idx = lua_absindex(L, idx);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING) {
      if (lua_type(L, -1) == LUA_TNUMBER) continue; /* array part */
      luaL_error(L, "%s: option keys must be strings", fname);
    }
    const char *k = lua_tostring(L, -1);
    int ok = 0;
    for (int i = 0; known[i]; i++)
      if (strcmp(known[i], k) == 0) { ok = 1; break; }
    if (!ok) luaL_error(L, "%s: unknown option '%s'", fname, k);
  }
}

/* ---- rbe.null ---- */

static int null_tostring(lua_State *L) {
  lua_pushliteral(L, "null");
  return 1;
}

void rbe_push_null(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &null_key) != LUA_TNIL) return;
  lua_pop(L, 1);
  lua_newuserdatauv(L, 0, 0);
  lua_createtable(L, 0, 2);
  lua_pushcfunction(L, null_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushliteral(L, "rbe.null");
  lua_setfield(L, -2, "__name");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &null_key);
}

/* ---- secrets ----
 * A secret is a userdata whose single user value is the real value; its
 * __tostring is "***" so nothing prints it by accident.  rbe.reveal(s)
 * gives the value back for the code that must send it somewhere. */

static int secret_tostring(lua_State *L) {
  lua_pushliteral(L, "***");
  return 1;
}

static int secret_concat(lua_State *L);

static void push_secret(lua_State *L, int vidx) {
  vidx = lua_absindex(L, vidx);
  lua_newuserdatauv(L, 0, 1);
  lua_pushvalue(L, vidx);
  lua_setiuservalue(L, -2, 1);
  if (luaL_newmetatable(L, RBE_SECRET_MT)) {
    lua_pushcfunction(L, secret_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, secret_concat);
    lua_setfield(L, -2, "__concat");
    lua_pushliteral(L, "rbe.secret");
    lua_setfield(L, -2, "__name");
    lua_pushliteral(L, "secret");
    lua_setfield(L, -2, "__metatable");
  }
  lua_setmetatable(L, -2);
}

void rbe_push_revealed(lua_State *L, int idx) {
  if (luaL_testudata(L, idx, RBE_SECRET_MT)) lua_getiuservalue(L, idx, 1);
  else lua_pushvalue(L, idx);
}

/* "Bearer " .. secret stays a secret */
static int secret_concat(lua_State *L) {
  rbe_push_revealed(L, 1);
  rbe_push_revealed(L, 2);
  for (int i = -2; i <= -1; i++)
    if (!lua_isstring(L, i))
      return luaL_error(L, "attempt to concatenate a %s value",
                        luaL_typename(L, i));
  lua_concat(L, 2);
  push_secret(L, -1);
  return 1;
}

/* rbe.secret(v) -> secret (a secret stays itself) */
static int l_secret(lua_State *L) {
  luaL_checkany(L, 1);
  if (luaL_testudata(L, 1, RBE_SECRET_MT)) { lua_settop(L, 1); return 1; }
  push_secret(L, 1);
  return 1;
}

/* rbe.reveal(v) -> the value inside a secret, or v itself */
static int l_reveal(lua_State *L) {
  luaL_checkany(L, 1);
  rbe_push_revealed(L, 1);
  return 1;
}

/* rbe.is_secret(v) -> boolean */
static int l_is_secret(lua_State *L) {
  lua_pushboolean(L, luaL_testudata(L, 1, RBE_SECRET_MT) != NULL);
  return 1;
}

/* rbe._counts() -> {waits, refs, handles, tasks} */
static int l_counts(lua_State *L) {
  static const char *const names[RBE_COUNT_N] = {"waits", "refs", "handles",
                                                 "tasks"};
  lua_createtable(L, 0, RBE_COUNT_N);
  for (int i = 0; i < RBE_COUNT_N; i++) {
    lua_pushinteger(L, rbe_counts[i]);
    lua_setfield(L, -2, names[i]);
  }
  return 1;
}

/* rbe.setenv(name, value|nil) -> nothing: set (or unset) a variable of
 * this process's environment, inherited by children started later. */
static int l_setenv(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  int r;
  if (lua_isnoneornil(L, 2)) r = uv_os_unsetenv(name);
  else {
    rbe_push_revealed(L, 2);
    r = uv_os_setenv(name, luaL_checkstring(L, -1));
  }
  if (r < 0) return luaL_error(L, "rbe.setenv(%s): %s", name, uv_strerror(r));
  return 0;
}

static const luaL_Reg aux_funcs[] = {
  {"setenv", l_setenv},
  {"error", l_error_new},
  {"is_error", l_is_error},
  {"duration", l_duration},
  {"secret", l_secret},
  {"reveal", l_reveal},
  {"is_secret", l_is_secret},
  {"_counts", l_counts},
  {NULL, NULL}
};

int luaopen_rbe_aux(lua_State *L) {
  luaL_newlib(L, aux_funcs);
  rbe_push_null(L);
  lua_setfield(L, -2, "null");
  push_error_mt(L);
  lua_setfield(L, -2, "_error_mt");
  return 1;
}
