/* aux.h: helpers shared by every core file: error objects, durations,
 * option-table readers, rbe.null and the debug counters that the test
 * harness checks after each spec. */
#ifndef RBE_AUX_H
#define RBE_AUX_H

#include <lua.h>
#include <lauxlib.h>

#define RBE_ERROR_MT "rbe.error"
#define RBE_SECRET_MT "rbe.secret"

/* Push a new error object {kind, message, retryable}; code left nil. */
void rbe_error_push(lua_State *L, const char *kind, int retryable,
                    const char *fmt, ...);
/* Set field `code` of the error object on top of the stack. */
void rbe_error_code_str(lua_State *L, const char *code);
void rbe_error_code_int(lua_State *L, lua_Integer code);
/* Push an error object and raise it.  Never returns. */
int rbe_error_raise(lua_State *L, const char *kind, const char *code,
                    int retryable, const char *fmt, ...);
/* Push an error object for a failed syscall/libuv call (code = errno name). */
void rbe_error_push_uv(lua_State *L, const char *kind, int uverr,
                       const char *fmt, ...);
int rbe_is_error(lua_State *L, int idx);

/* Durations: a number of seconds or "250ms", "5s", "2m", "1h", "1m30s".
 * Returns seconds; raises a clear error naming `what` for a bad value. */
double rbe_check_duration(lua_State *L, int idx, const char *what);
/* Parse a duration string; returns 0 and sets *out on success, -1 if bad. */
int rbe_parse_duration(const char *s, double *out);
/* Field `name` of the table at idx as a duration, or `def` when absent. */
double rbe_opt_duration_field(lua_State *L, int idx, const char *name,
                              double def);
/* Milliseconds for libuv timers, rounding up, at least 0. */
unsigned long long rbe_duration_ms(double seconds);

/* Option tables: read field `name` of the table at idx (absent -> def). */
int rbe_opt_bool_field(lua_State *L, int idx, const char *name, int def);
lua_Integer rbe_opt_int_field(lua_State *L, int idx, const char *name,
                              lua_Integer def);
const char *rbe_opt_string_field(lua_State *L, int idx, const char *name,
                                 const char *def, size_t *len);
/* Raise if the table at idx has a key not in `known` (NULL-terminated). */
void rbe_check_known_fields(lua_State *L, int idx, const char *fname,
                            const char *const known[]);

/* rbe.null: a unique light value for SQL NULL / redis nil. */
void rbe_push_null(lua_State *L);

/* Secrets: rbe.secret(v) values.  Pushes the raw value if idx is a secret,
 * else a copy of the value at idx. */
void rbe_push_revealed(lua_State *L, int idx);

/* Debug counters (always compiled; cheap).  Kinds below. */
enum { RBE_COUNT_WAITS, RBE_COUNT_REFS, RBE_COUNT_HANDLES, RBE_COUNT_TASKS,
       RBE_COUNT_N };
extern long rbe_counts[RBE_COUNT_N];
int rbe_ref(lua_State *L);             /* luaL_ref(L, REGISTRY) + count */
void rbe_unref(lua_State *L, int *ref); /* unref, count, set LUA_NOREF */

int luaopen_rbe_aux(lua_State *L);

#endif
