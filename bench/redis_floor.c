/* bench/redis_floor.c: the C hiredis floor for bench/redis.lua (built as
 * build/bin/rbe-redis-floor).  A minimal blocking hiredis program:
 *
 *   rbe-redis-floor fill PORT TOTAL MATCHING
 *       SET MATCHING keys gemini:<i> and TOTAL-MATCHING keys other:<i>
 *       (MSETs of 500 keys, 10 per round trip)
 *   rbe-redis-floor flush PORT PATTERN COUNT
 *       delete the keys matching PATTERN the way rbe's unlink_matching
 *       does: SCAN cursor MATCH PATTERN COUNT COUNT, each page's keys in
 *       one UNLINK sent right after the SCAN for the next page; prints
 *       "deleted N in S s"
 *   rbe-redis-floor ping PORT INTERVAL_MS
 *       PING every INTERVAL_MS until SIGTERM/SIGINT, then prints
 *       "pings N worst_ms W" (the worst round trip seen)
 */
#include <hiredis/hiredis.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static redisContext *connect_port(int port) {
  redisContext *c = redisConnect("127.0.0.1", port);
  if (!c || c->err) {
    fprintf(stderr, "rbe-redis-floor: connect 127.0.0.1:%d: %s\n", port,
            c ? c->errstr : "out of memory");
    exit(1);
  }
  return c;
}

static redisReply *get_reply(redisContext *c) {
  void *r = NULL;
  if (redisGetReply(c, &r) != REDIS_OK || !r) {
    fprintf(stderr, "rbe-redis-floor: %s\n", c->errstr);
    exit(1);
  }
  redisReply *reply = r;
  if (reply->type == REDIS_REPLY_ERROR) {
    fprintf(stderr, "rbe-redis-floor: error reply: %s\n", reply->str);
    exit(1);
  }
  return reply;
}

/* MSETs of 500 keys, 10 in flight */
static int fill(int port, long total, long matching) {
  redisContext *c = connect_port(port);
  enum { PER = 500 };
  static char keys[PER][32];
  const char *argv[1 + 2 * PER];
  size_t lens[1 + 2 * PER];
  long pending = 0;
  for (long i = 0; i < total;) {
    int n = 0;
    argv[0] = "MSET";
    lens[0] = 4;
    for (; n < PER && i < total; n++, i++) {
      if (i < matching) snprintf(keys[n], sizeof keys[n], "gemini:%ld", i);
      else snprintf(keys[n], sizeof keys[n], "other:%ld", i - matching);
      argv[1 + 2 * n] = keys[n];
      lens[1 + 2 * n] = strlen(keys[n]);
      argv[2 + 2 * n] = "cached-value";
      lens[2 + 2 * n] = 12;
    }
    redisAppendCommandArgv(c, 1 + 2 * n, argv, lens);
    if (++pending == 10 || i == total) {
      while (pending) {
        freeReplyObject(get_reply(c));
        pending--;
      }
    }
  }
  redisFree(c);
  return 0;
}

static void append_scan(redisContext *c, const char *cursor, const char *pat,
                        const char *count) {
  const char *argv[6] = {"SCAN", cursor, "MATCH", pat, "COUNT", count};
  redisAppendCommandArgv(c, 6, argv, NULL);
}

/* Each page's keys go in one UNLINK, sent right after the SCAN for the
 * next page; the client reads the next page while the server unlinks, so
 * the server never waits for the client. */
static int flush(int port, const char *pat, const char *count) {
  redisContext *c = connect_port(port);
  double t0 = now();
  long long deleted = 0;
  append_scan(c, "0", pat, count);
  redisReply *page = get_reply(c);
  const char **argv = NULL;
  size_t *lens = NULL;
  size_t cap = 0;
  int unlink_pending = 0;
  for (;;) {
    const char *cursor = page->element[0]->str;
    redisReply *keys = page->element[1];
    int last = strcmp(cursor, "0") == 0;
    if (!last) append_scan(c, cursor, pat, count);
    if (keys->elements > 0) {
      if (keys->elements + 1 > cap) {
        cap = keys->elements + 1;
        argv = realloc(argv, cap * sizeof *argv);
        lens = realloc(lens, cap * sizeof *lens);
      }
      argv[0] = "UNLINK";
      lens[0] = 6;
      for (size_t i = 0; i < keys->elements; i++) {
        argv[i + 1] = keys->element[i]->str;
        lens[i + 1] = keys->element[i]->len;
      }
      redisAppendCommandArgv(c, (int)keys->elements + 1, argv, lens);
    }
    int had_keys = keys->elements > 0;
    freeReplyObject(page);
    /* the previous page's UNLINK (reading flushes what was appended) */
    if (unlink_pending) {
      redisReply *n = get_reply(c);
      deleted += n->integer;
      freeReplyObject(n);
    } else {
      int done = 0;
      while (!done)
        if (redisBufferWrite(c, &done) != REDIS_OK) {
          fprintf(stderr, "rbe-redis-floor: %s\n", c->errstr);
          exit(1);
        }
    }
    unlink_pending = had_keys;
    if (last) break;
    page = get_reply(c);
  }
  if (unlink_pending) {
    redisReply *n = get_reply(c);
    deleted += n->integer;
    freeReplyObject(n);
  }
  double dt = now() - t0;
  printf("deleted %lld in %.6f s\n", deleted, dt);
  free(argv);
  free(lens);
  redisFree(c);
  return 0;
}

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static int ping(int port, int interval_ms) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  redisContext *c = connect_port(port);
  double worst = 0;
  long n = 0;
  double next = now();
  printf("ready\n");
  fflush(stdout);
  while (!stop) {
    double t0 = now();
    redisReply *r = redisCommand(c, "PING");
    double dt = now() - t0;
    if (!r) break;
    freeReplyObject(r);
    n++;
    if (dt > worst) worst = dt;
    next += interval_ms / 1000.0;
    double wait = next - now();
    if (wait < 0) { next = now(); continue; }
    struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
    nanosleep(&ts, NULL);
  }
  printf("pings %ld worst_ms %.3f\n", n, worst * 1000);
  redisFree(c);
  return 0;
}

int main(int argc, char **argv) {
  if (argc >= 5 && strcmp(argv[1], "fill") == 0)
    return fill(atoi(argv[2]), atol(argv[3]), atol(argv[4]));
  if (argc >= 5 && strcmp(argv[1], "flush") == 0)
    return flush(atoi(argv[2]), argv[3], argv[4]);
  if (argc >= 4 && strcmp(argv[1], "ping") == 0)
    return ping(atoi(argv[2]), atoi(argv[3]));
  fprintf(stderr, "usage: rbe-redis-floor fill PORT TOTAL MATCHING | "
          "flush PORT PATTERN COUNT | ping PORT INTERVAL_MS\n");
  return 2;
}
