/* pg.c: placeholder until the pg client lands (loadable module) */
#include "aux.h"
int luaopen_rbe_pg(lua_State *L) {
  lua_newtable(L);
  lua_newtable(L);
  lua_setfield(L, -2, "_versions");
  return 1;
}
