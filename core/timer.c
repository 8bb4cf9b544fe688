/* timer.c: rbe.sleep and rbe.now.  Each sleep owns a malloc'd uv_timer_t
 * that is freed only in its close callback; the waiting task is resumed
 * through the bridge, never from the timer callback itself. */
#include "aux.h"
#include "task.h"

#include <stdlib.h>

typedef struct {
  uv_timer_t timer;
  rbe_wait *w;
} sleep_req;

static void sleep_close_cb(uv_handle_t *h) {
  free(h->data);
  rbe_counts[RBE_COUNT_HANDLES]--;
}

static void sleep_timer_cb(uv_timer_t *timer) {
  sleep_req *r = timer->data;
  rbe_wait_done(r->w, rbe_push_nothing, NULL);
  uv_close((uv_handle_t *)timer, sleep_close_cb);
}

static void sleep_cancel(void *ud) {
  sleep_req *r = ud;
  uv_timer_stop(&r->timer);
  uv_close((uv_handle_t *)&r->timer, sleep_close_cb);
}

/* rbe.sleep(d) -> nothing  [yields] */
static int l_sleep(lua_State *L) {
  double secs = rbe_check_duration(L, 1, "rbe.sleep");
  rbe_wait *w = rbe_wait_new(L, "rbe.sleep");
  sleep_req *r = malloc(sizeof *r);
  if (!r) return luaL_error(L, "rbe.sleep: out of memory");
  r->w = w;
  uv_timer_init(rbe_loop(), &r->timer);
  rbe_counts[RBE_COUNT_HANDLES]++;
  r->timer.data = r;
  uv_timer_start(&r->timer, sleep_timer_cb, rbe_duration_ms(secs), 0);
  return rbe_wait_yield(L, w, sleep_cancel, r);
}

/* rbe.now() -> monotonic seconds (float) */
static int l_now(lua_State *L) {
  lua_pushnumber(L, (double)uv_hrtime() / 1e9);
  return 1;
}

/* rbe.time() -> wall-clock seconds since the epoch (float) */
static int l_time(lua_State *L) {
  uv_timeval64_t tv;
  uv_gettimeofday(&tv);
  lua_pushnumber(L, (double)tv.tv_sec + tv.tv_usec / 1e6);
  return 1;
}

static const luaL_Reg timer_funcs[] = {
  {"sleep", l_sleep},
  {"now", l_now},
  {"time", l_time},
  {NULL, NULL}
};

int luaopen_rbe_timer(lua_State *L) {
  luaL_newlib(L, timer_funcs);
  return 1;
}
