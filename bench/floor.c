/* bench/floor.c: the startup floor rbe is measured against: a program that
 * links the same libraries as rbe, creates a Lua state with the standard
 * libraries and cjson, and runs an empty chunk on a libuv loop. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <uv.h>

int luaopen_cjson(lua_State *L);

static void idle_cb(uv_idle_t *h) {
  lua_State *L = h->data;
  luaL_loadstring(L, "");
  lua_call(L, 0, 0);
  uv_idle_stop(h);
  uv_close((uv_handle_t *)h, NULL);
}

int main(void) {
  uv_loop_t *loop = uv_default_loop();
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "cjson", luaopen_cjson, 0);
  lua_pop(L, 1);
  uv_idle_t idle;
  uv_idle_init(loop, &idle);
  idle.data = L;
  uv_idle_start(&idle, idle_cb);
  uv_run(loop, UV_RUN_DEFAULT);
  lua_close(L);
  uv_loop_close(loop);
  return 0;
}
