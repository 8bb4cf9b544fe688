/* fs.c: placeholder, replaced by the fs implementation */
#include "aux.h"
int luaopen_rbe_fs(lua_State *L) { lua_newtable(L); return 1; }
