/* bench/eager_floor.c: the floor program (bench/floor.c) with libpq,
 * libcurl, hiredis and libedit loaded at start, as an executable that links
 * them directly would.  bench/startup.lua prints it to show what rbe's
 * lazy loading of those clients saves. */
#include <curl/curl.h>
#include <hiredis/hiredis.h>
#include <histedit.h>
#include <libpq-fe.h>
#include <stdio.h>

#define main floor_main
#include "floor.c"
#undef main

int main(void) {
  /* touch each library so the linker keeps it */
  volatile long keep = PQlibVersion() + (long)curl_version_info(CURLVERSION_NOW)
                       + (long)(void *)redisFree + (long)(void *)el_init;
  (void)keep;
  return floor_main();
}
