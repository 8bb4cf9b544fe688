/* bench/pg_floor.c: the floor rbe.pg is measured against: blocking libpq,
 * used the way rbe.pg uses it on one connection (extended protocol, text
 * results), with no event loop and no Lua.
 *
 *   rbe-pg-floor URL N seq    N x PQexecParams("SELECT 1"), one at a time
 *   rbe-pg-floor URL N pipe   N x PQsendQueryParams in pipeline mode, one
 *                             PQpipelineSync, then every result read back
 *
 * Prints the elapsed seconds of the N queries (connecting not included). */
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(PGconn *c, const char *what) {
  fprintf(stderr, "rbe-pg-floor: %s: %s", what, PQerrorMessage(c));
  exit(1);
}

static void check_one(PGconn *c, PGresult *r) {
  if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1 ||
      strcmp(PQgetvalue(r, 0, 0), "1") != 0)
    die(c, "unexpected result");
  PQclear(r);
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: rbe-pg-floor URL N seq|pipe\n");
    return 2;
  }
  long n = atol(argv[2]);
  int pipe = strcmp(argv[3], "pipe") == 0;
  PGconn *c = PQconnectdb(argv[1]);
  if (PQstatus(c) != CONNECTION_OK) die(c, "connect");
  check_one(c, PQexecParams(c, "SELECT 1", 0, NULL, NULL, NULL, NULL, 0));
  double t0 = now();
  if (!pipe) {
    for (long i = 0; i < n; i++)
      check_one(c, PQexecParams(c, "SELECT 1", 0, NULL, NULL, NULL, NULL, 0));
  } else {
    if (!PQenterPipelineMode(c)) die(c, "pipeline mode");
    for (long i = 0; i < n; i++)
      if (!PQsendQueryParams(c, "SELECT 1", 0, NULL, NULL, NULL, NULL, 0))
        die(c, "send");
    if (!PQpipelineSync(c)) die(c, "sync");
    for (long i = 0; i < n; i++) {
      check_one(c, PQgetResult(c));
      if (PQgetResult(c) != NULL) die(c, "expected the end of a result");
    }
    PGresult *r = PQgetResult(c);
    if (PQresultStatus(r) != PGRES_PIPELINE_SYNC) die(c, "expected the sync");
    PQclear(r);
    if (!PQexitPipelineMode(c)) die(c, "exit pipeline mode");
  }
  printf("%.6f\n", now() - t0);
  PQfinish(c);
  return 0;
}
