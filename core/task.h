/* task.h: the scheduler and the await bridge, the single door between C
 * completion callbacks (libuv, libpq, curl, hiredis) and Lua coroutines.
 *
 * A waiting primitive does, in this order:
 *   rbe_wait *w = rbe_wait_new(L, "proc.run");  -- raises outside a task
 *   ...everything that can raise...
 *   start the libuv/libpq/... work, passing w (or a struct holding it)
 *   return rbe_wait_yield(L, w, cancel_fn, ud);
 * and later, from a completion callback, exactly one of
 *   rbe_wait_done(w, push_fn, ud)   -- resume with push_fn's values
 *   rbe_wait_fail(w, push_fn, ud)   -- push_fn pushes one error object
 * Both only enqueue: the scheduler resumes from its own uv_idle handle, so
 * no library frame is ever below a lua_resume.  push_fn is called exactly
 * once, with L == NULL when the result is discarded (the task was cancelled
 * meanwhile), so it is also the one place to free ud.
 *
 * If the task is cancelled or times out while waiting, cancel_fn(ud) is
 * called instead: it must stop the request (or arrange its cleanup) and
 * never call done/fail for it.  After done, fail or cancel the primitive
 * never touches w again. */
#ifndef RBE_TASK_H
#define RBE_TASK_H

#include <lua.h>
#include <uv.h>

typedef struct rbe_wait rbe_wait;
typedef struct rbe_task rbe_task;
typedef void (*rbe_cancel_fn)(void *ud);
typedef int (*rbe_push_fn)(lua_State *L, void *ud);

uv_loop_t *rbe_loop(void);

rbe_wait *rbe_wait_new(lua_State *L, const char *what);
int rbe_wait_yield(lua_State *L, rbe_wait *w, rbe_cancel_fn cancel, void *ud);
/* Same, with the primitive's own continuation k(L, status, ctx); k calls
 * rbe_wait_values(L, ctx), which raises the failure or returns the number
 * of values pushed (they are the top of the stack). */
int rbe_wait_yieldk(lua_State *L, rbe_wait *w, rbe_cancel_fn cancel,
                    void *ud, lua_KFunction k);
int rbe_wait_values(lua_State *L, lua_KContext ctx);
void rbe_wait_done(rbe_wait *w, rbe_push_fn push, void *ud);
void rbe_wait_fail(rbe_wait *w, rbe_push_fn push, void *ud);
/* Ready-made push functions. */
int rbe_push_nothing(lua_State *L, void *ud);

/* The task running now (NULL outside any task). */
rbe_task *rbe_task_current(void);

/* Scheduler life cycle (main.c). */
void rbe_sched_init(lua_State *L, uv_loop_t *loop);
/* Create a task running the function on top of L with nargs arguments
 * below it... (stack: fn, args) -> pops them, pushes the task handle. */
rbe_task *rbe_task_spawn(lua_State *L, int nargs);
/* Run the loop until no task is alive.  Returns the number of tasks still
 * alive when nothing could make progress (0 normally). */
int rbe_sched_run(void);
/* Cancel every live task (SIGINT/SIGTERM, shutdown); interrupt marks the
 * cancelled errors as an operator's interruption (err.interrupted). */
void rbe_sched_cancel_all(const char *why, int interrupt);
/* After rbe_sched_run: status of the finished task at stack index idx:
 * 0 ok, 1 failed, 2 cancelled; if failed/cancelled, pushes the error. */
int rbe_task_outcome(lua_State *L, int idx, rbe_task *t);
/* Exit code requested by os.exit inside a task, or -1. */
int rbe_sched_exit_code(void);
/* Called from the signal handler context: make the running task's Lua
 * code stop at the next instruction (lua.c's trick). */
void rbe_sched_interrupt_running(void);
void rbe_sched_close(void);

int luaopen_rbe_core(lua_State *L);

#include <signal.h>
extern volatile sig_atomic_t rbe_nsignals;

#endif
