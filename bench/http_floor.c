/* bench/http_floor.c: the floor for rbe.http's throughput.  N GETs of one
 * URL with CONC in flight, done the way a minimal C program on libcurl's
 * multi socket interface and libuv does them: CONC easy handles set up
 * once, each removed and re-added when its transfer ends, sockets mapped
 * to uv_poll_t and curl's timer to a uv_timer_t (0 ms = next loop turn),
 * bodies counted and dropped.  No Lua, no tasks, no result tables: what
 * is left is libcurl and libuv themselves.
 *
 *   rbe-http-floor URL [N] [CONC]
 *   -> "requests=N errors=E seconds=S rate=R" on stdout */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <uv.h>

typedef struct {
  uv_poll_t poll;
  curl_socket_t fd;
} sock;

static uv_loop_t *loop;
static uv_timer_t timer;
static CURLM *multi;
static long total, started, finished, errors;
static size_t bytes;

static size_t write_cb(char *p, size_t size, size_t n, void *ud) {
  (void)p; (void)ud;
  bytes += size * n;
  return size * n;
}

static void check_done(void) {
  CURLMsg *m;
  int left;
  while ((m = curl_multi_info_read(multi, &left))) {
    if (m->msg != CURLMSG_DONE) continue;
    CURL *e = m->easy_handle;
    long status = 0;
    if (m->data.result != CURLE_OK) errors++;
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
    if (status != 200) errors++;
    finished++;
    curl_multi_remove_handle(multi, e);
    if (started < total) {
      started++;
      curl_multi_add_handle(multi, e);
    } else {
      curl_easy_cleanup(e);
    }
  }
}

static void poll_cb(uv_poll_t *h, int status, int events) {
  sock *s = h->data;
  int flags = 0, running;
  if (status < 0) flags = CURL_CSELECT_ERR;
  if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  curl_multi_socket_action(multi, s->fd, flags, &running);
  check_done();
}

static void close_cb(uv_handle_t *h) { free(h->data); }

static int socket_cb(CURL *e, curl_socket_t fd, int what, void *up, void *sp) {
  sock *s = sp;
  (void)e; (void)up;
  if (what == CURL_POLL_REMOVE) {
    if (s) {
      uv_poll_stop(&s->poll);
      uv_close((uv_handle_t *)&s->poll, close_cb);
      curl_multi_assign(multi, fd, NULL);
    }
    return 0;
  }
  if (!s) {
    s = malloc(sizeof *s);
    s->fd = fd;
    uv_poll_init_socket(loop, &s->poll, fd);
    s->poll.data = s;
    curl_multi_assign(multi, fd, s);
  }
  int ev = 0;
  if (what & CURL_POLL_IN) ev |= UV_READABLE;
  if (what & CURL_POLL_OUT) ev |= UV_WRITABLE;
  uv_poll_start(&s->poll, ev, poll_cb);
  return 0;
}

static void timeout_cb(uv_timer_t *t) {
  int running;
  (void)t;
  curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
  check_done();
}

static int timer_cb(CURLM *m, long ms, void *up) {
  (void)m; (void)up;
  if (ms < 0) uv_timer_stop(&timer);
  else uv_timer_start(&timer, timeout_cb, (uint64_t)ms, 0);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s URL [N] [CONC]\n", argv[0]);
    return 2;
  }
  const char *url = argv[1];
  total = argc > 2 ? atol(argv[2]) : 20000;
  long conc = argc > 3 ? atol(argv[3]) : 64;
  if (conc > total) conc = total;
  curl_global_init(CURL_GLOBAL_DEFAULT);
  loop = uv_default_loop();
  uv_timer_init(loop, &timer);
  multi = curl_multi_init();
  curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
  curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, timer_cb);
  uint64_t t0 = uv_hrtime();
  for (long i = 0; i < conc; i++) {
    CURL *e = curl_easy_init();
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
    started++;
    curl_multi_add_handle(multi, e);
  }
  uv_run(loop, UV_RUN_DEFAULT);
  double secs = (double)(uv_hrtime() - t0) / 1e9;
  printf("requests=%ld errors=%ld seconds=%.3f rate=%.0f\n", finished, errors,
         secs, (double)finished / secs);
  curl_multi_cleanup(multi);
  uv_close((uv_handle_t *)&timer, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  curl_global_cleanup();
  return errors ? 1 : 0;
}
