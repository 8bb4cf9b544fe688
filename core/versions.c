/* versions.c: rbe.versions() -> {rbe, lua, libuv, lua-cjson}: the
 * libraries of the executable itself.  The loadable modules (pg, http,
 * redis, repl) report theirs as `_versions` of their core module; `rbe
 * version` merges them. */
#include "aux.h"

#include <lua.h>
#include <uv.h>

void rbe_versions_push(lua_State *L) {
  lua_createtable(L, 0, 8);
  lua_pushliteral(L, RBE_VERSION);
  lua_setfield(L, -2, "rbe");
  lua_pushliteral(L, LUA_RELEASE);
  lua_setfield(L, -2, "lua");
  lua_pushstring(L, uv_version_string());
  lua_setfield(L, -2, "libuv");
  lua_getglobal(L, "require");
  lua_pushliteral(L, "cjson");
  if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_istable(L, -1)) {
    lua_getfield(L, -1, "_VERSION");
    lua_setfield(L, -3, "lua-cjson");
  }
  lua_pop(L, 1);
}
