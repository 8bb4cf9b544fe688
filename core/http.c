/* http.c: HTTP(S) requests on libcurl's multi socket interface, driven by
 * the libuv loop (module "rbe.http.core", wrapped by lua/rbe/http.lua,
 * which builds the request spec, masks secrets, raises on statuses and
 * retries).  One CURLM per process: CURLMOPT_SOCKETFUNCTION maps each
 * socket curl watches to a malloc'd uv_poll_t, CURLMOPT_TIMERFUNCTION to
 * one uv_timer_t.  A curl timeout of 0 means "soon": the uv timer fires on
 * the next loop turn, curl is never re-entered from its own callback.
 * Connections live in the multi handle's cache and are reused across
 * requests; easy handles are pooled (curl_easy_reset) between requests.
 *
 * Ownership: a request (`hreq`) is malloc'd and owned by C from the call
 * until exactly one of (a) its push function ran (the task got the result,
 * or L == NULL: the result was discarded) or (b) its cancel function ran
 * (task cancelled, rbe.timeout): cancel removes the easy handle from the
 * multi handle, cleans it up (a half-done connection is closed, never
 * reused), deletes a partial output file and frees the request.  A poll
 * context is freed only in its uv_close callback.  Requests of a
 * http.client with max_per_host wait in a per-host queue (`gate`) in C
 * before they are added to the multi handle.
 *
 * The multi handle, its timer and the pooled easy handles are torn down by
 * the __gc of a state userdata anchored in the registry (at lua_close);
 * the module marks its own .so RTLD_NODELETE so close callbacks that run
 * after lua_close (main.c's last uv_run) still have their code. */
#include "aux.h"
#include "task.h"

#include <curl/curl.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define STATE_MT "rbe.http.state"
#define POOL_MAX 64
#define EXCERPT_MAX 512
#define HEADERS_MAX (1024 * 1024)

enum { R_NEW, R_QUEUED, R_ACTIVE, R_DONE };

typedef struct hreq hreq;

/* Requests of one client to one host, at most `limit` in the multi. */
typedef struct gate {
  struct gate *next;
  int active, limit;
  hreq *qhead, *qtail;
  char key[];
} gate;

typedef struct {
  uv_poll_t poll;
  curl_socket_t fd;
} sockctx;

struct hreq {
  CURL *easy;
  rbe_wait *w;
  int state;
  gate *g;
  hreq *qnext;               /* gate queue */
  hreq *prev, *next;         /* S.active list */
  struct curl_slist *headers;
  CURLcode result;
  char errbuf[CURL_ERROR_SIZE];
  /* response */
  long status;
  char reason[64];
  char *body;
  size_t blen, bcap, max_body;
  int overflow;
  char *hbuf;                /* header lines of the last response, '\n' */
  size_t hlen, hcap;
  char *eff_url;
  long redirects, http_version;
  curl_off_t t_dns, t_connect, t_tls, t_first, t_total, t_redirect;
  /* output = path: body streamed to tmp_path, renamed to out_path */
  int out_fd;
  char *out_path, *tmp_path;
  int out_errno;
  const char *out_step;
  curl_off_t written;
  int kept;
  char *excerpt;             /* first EXCERPT_MAX bytes of the body */
  size_t exlen;
  int raise;
  int dirty;                 /* options beyond the baseline were set */
  int *expect;
  int nexpect;
  /* body_file = path */
  int in_fd;
};

static struct {
  int inited;
  CURLM *multi;
  uv_timer_t timer;
  hreq *active;
  long nactive, nqueued, npolls, neasy, nmulti;
  gate *gates;
  CURL *pool[POOL_MAX];
  int npool;
} S;

static void check_multi_info(void);
static void finish(hreq *r, CURLcode result);

/* ---- curl error names ---- */

static const char *const curle_names[] = {
  "CURLE_OK", "CURLE_UNSUPPORTED_PROTOCOL", "CURLE_FAILED_INIT",
  "CURLE_URL_MALFORMAT", "CURLE_NOT_BUILT_IN", "CURLE_COULDNT_RESOLVE_PROXY",
  "CURLE_COULDNT_RESOLVE_HOST", "CURLE_COULDNT_CONNECT",
  "CURLE_WEIRD_SERVER_REPLY", "CURLE_REMOTE_ACCESS_DENIED",
  "CURLE_FTP_ACCEPT_FAILED", "CURLE_FTP_WEIRD_PASS_REPLY",
  "CURLE_FTP_ACCEPT_TIMEOUT", "CURLE_FTP_WEIRD_PASV_REPLY",
  "CURLE_FTP_WEIRD_227_FORMAT", "CURLE_FTP_CANT_GET_HOST", "CURLE_HTTP2",
  "CURLE_FTP_COULDNT_SET_TYPE", "CURLE_PARTIAL_FILE",
  "CURLE_FTP_COULDNT_RETR_FILE", "CURLE_OBSOLETE20", "CURLE_QUOTE_ERROR",
  "CURLE_HTTP_RETURNED_ERROR", "CURLE_WRITE_ERROR", "CURLE_OBSOLETE24",
  "CURLE_UPLOAD_FAILED", "CURLE_READ_ERROR", "CURLE_OUT_OF_MEMORY",
  "CURLE_OPERATION_TIMEDOUT", "CURLE_OBSOLETE29", "CURLE_FTP_PORT_FAILED",
  "CURLE_FTP_COULDNT_USE_REST", "CURLE_OBSOLETE32", "CURLE_RANGE_ERROR",
  "CURLE_HTTP_POST_ERROR", "CURLE_SSL_CONNECT_ERROR",
  "CURLE_BAD_DOWNLOAD_RESUME", "CURLE_FILE_COULDNT_READ_FILE",
  "CURLE_LDAP_CANNOT_BIND", "CURLE_LDAP_SEARCH_FAILED", "CURLE_OBSOLETE40",
  "CURLE_FUNCTION_NOT_FOUND", "CURLE_ABORTED_BY_CALLBACK",
  "CURLE_BAD_FUNCTION_ARGUMENT", "CURLE_OBSOLETE44",
  "CURLE_INTERFACE_FAILED", "CURLE_OBSOLETE46", "CURLE_TOO_MANY_REDIRECTS",
  "CURLE_UNKNOWN_OPTION", "CURLE_SETOPT_OPTION_SYNTAX", "CURLE_OBSOLETE50",
  "CURLE_OBSOLETE51", "CURLE_GOT_NOTHING", "CURLE_SSL_ENGINE_NOTFOUND",
  "CURLE_SSL_ENGINE_SETFAILED", "CURLE_SEND_ERROR", "CURLE_RECV_ERROR",
  "CURLE_OBSOLETE57", "CURLE_SSL_CERTPROBLEM", "CURLE_SSL_CIPHER",
  "CURLE_PEER_FAILED_VERIFICATION", "CURLE_BAD_CONTENT_ENCODING",
  "CURLE_OBSOLETE62", "CURLE_FILESIZE_EXCEEDED", "CURLE_USE_SSL_FAILED",
  "CURLE_SEND_FAIL_REWIND", "CURLE_SSL_ENGINE_INITFAILED",
  "CURLE_LOGIN_DENIED", "CURLE_TFTP_NOTFOUND", "CURLE_TFTP_PERM",
  "CURLE_REMOTE_DISK_FULL", "CURLE_TFTP_ILLEGAL", "CURLE_TFTP_UNKNOWNID",
  "CURLE_REMOTE_FILE_EXISTS", "CURLE_TFTP_NOSUCHUSER", "CURLE_OBSOLETE75",
  "CURLE_OBSOLETE76", "CURLE_SSL_CACERT_BADFILE",
  "CURLE_REMOTE_FILE_NOT_FOUND", "CURLE_SSH", "CURLE_SSL_SHUTDOWN_FAILED",
  "CURLE_AGAIN", "CURLE_SSL_CRL_BADFILE", "CURLE_SSL_ISSUER_ERROR",
  "CURLE_FTP_PRET_FAILED", "CURLE_RTSP_CSEQ_ERROR",
  "CURLE_RTSP_SESSION_ERROR", "CURLE_FTP_BAD_FILE_LIST",
  "CURLE_CHUNK_FAILED", "CURLE_NO_CONNECTION_AVAILABLE",
  "CURLE_SSL_PINNEDPUBKEYNOTMATCH", "CURLE_SSL_INVALIDCERTSTATUS",
  "CURLE_HTTP2_STREAM", "CURLE_RECURSIVE_API_CALL", "CURLE_AUTH_ERROR",
  "CURLE_HTTP3", "CURLE_QUIC_CONNECT_ERROR", "CURLE_PROXY",
  "CURLE_SSL_CLIENTCERT", "CURLE_UNRECOVERABLE_POLL",
};

static const char *curle_name(CURLcode c) {
  if ((size_t)c < sizeof curle_names / sizeof *curle_names)
    return curle_names[c];
  return "CURLE_UNKNOWN";
}

/* Failures worth another attempt: the server was not reached or the
 * connection broke before a response (see lua/rbe/http.lua's retries). */
static int curle_retryable(CURLcode c) {
  switch (c) {
  case CURLE_COULDNT_CONNECT: case CURLE_OPERATION_TIMEDOUT:
  case CURLE_GOT_NOTHING: case CURLE_SEND_ERROR: case CURLE_RECV_ERROR:
  case CURLE_PARTIAL_FILE: case CURLE_HTTP2: case CURLE_HTTP2_STREAM:
    return 1;
  default:
    return 0;
  }
}

/* ---- easy handles ---- */

/* A pooled handle keeps the baseline options (set_baseline) of the plain
 * GET it last ran; *fresh says a new handle still needs them. */
static CURL *easy_get(int *fresh) {
  *fresh = 0;
  if (S.npool) return S.pool[--S.npool];
  CURL *e = curl_easy_init();
  if (e) S.neasy++;
  *fresh = 1;
  return e;
}

static void easy_drop(CURL *e) {
  curl_easy_cleanup(e);
  S.neasy--;
}

static void set_baseline(CURL *e);

/* Back to the pool: a handle that ran more than a plain GET is reset to
 * the baseline; the request's buffers are about to be freed, so curl must
 * not keep pointing at them. */
static void easy_put(CURL *e, int dirty) {
  if (S.npool == POOL_MAX) { easy_drop(e); return; }
  if (dirty) {
    curl_easy_reset(e);
    set_baseline(e);
  } else {
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, NULL);
  }
  S.pool[S.npool++] = e;
}

/* ---- requests ---- */

static void req_free(hreq *r) {
  if (r->easy) easy_drop(r->easy);
  curl_slist_free_all(r->headers);
  if (r->out_fd >= 0) close(r->out_fd);
  if (r->tmp_path) unlink(r->tmp_path);
  if (r->in_fd >= 0) close(r->in_fd);
  free(r->tmp_path);
  free(r->out_path);
  free(r->body);
  free(r->hbuf);
  free(r->eff_url);
  free(r->expect);
  free(r->excerpt);
  free(r);
}

static void active_link(hreq *r) {
  r->prev = NULL;
  r->next = S.active;
  if (S.active) S.active->prev = r;
  S.active = r;
  S.nactive++;
}

static void active_unlink(hreq *r) {
  if (r->prev) r->prev->next = r->next;
  else S.active = r->next;
  if (r->next) r->next->prev = r->prev;
  r->prev = r->next = NULL;
  S.nactive--;
}

/* Hand the request to curl.  Returns a CURLMcode (0 on success). */
static int req_start(hreq *r) {
  CURLMcode mc = curl_multi_add_handle(S.multi, r->easy);
  if (mc != CURLM_OK) return (int)mc;
  r->state = R_ACTIVE;
  active_link(r);
  return 0;
}

/* ---- per-host gates (http.client max_per_host) ---- */

static gate *gate_get(const char *key, int limit) {
  for (gate *g = S.gates; g; g = g->next)
    if (strcmp(g->key, key) == 0) { g->limit = limit; return g; }
  size_t n = strlen(key);
  gate *g = calloc(1, sizeof *g + n + 1);
  if (!g) return NULL;
  memcpy(g->key, key, n + 1);
  g->limit = limit;
  g->next = S.gates;
  S.gates = g;
  return g;
}

static void gate_maybe_free(gate *g) {
  if (g->active || g->qhead) return;
  for (gate **p = &S.gates; *p; p = &(*p)->next)
    if (*p == g) { *p = g->next; break; }
  free(g);
}

static void gate_unqueue(gate *g, hreq *r) {
  hreq *prev = NULL;
  for (hreq *q = g->qhead; q; prev = q, q = q->qnext) {
    if (q != r) continue;
    if (prev) prev->qnext = q->qnext;
    else g->qhead = q->qnext;
    if (g->qtail == q) g->qtail = prev;
    S.nqueued--;
    break;
  }
  r->qnext = NULL;
}

/* A request of g left the multi handle: start the next queued ones. */
static void gate_release(gate *g) {
  g->active--;
  while (g->qhead && g->active < g->limit) {
    hreq *r = g->qhead;
    g->qhead = r->qnext;
    if (!g->qhead) g->qtail = NULL;
    r->qnext = NULL;
    S.nqueued--;
    g->active++;
    int mc = req_start(r);
    if (mc) {
      /* finish must not release g again: we are releasing it */
      r->g = NULL;
      g->active--;
      snprintf(r->errbuf, sizeof r->errbuf, "curl_multi_add_handle: %s",
               curl_multi_strerror((CURLMcode)mc));
      finish(r, CURLE_OUT_OF_MEMORY);
    }
  }
  gate_maybe_free(g);
}

/* ---- libcurl callbacks (no Lua in here) ---- */

static size_t write_cb(char *p, size_t size, size_t n, void *ud) {
  hreq *r = ud;
  size_t len = size * n;
  if (r->out_fd >= 0) {
    if (r->exlen < EXCERPT_MAX && r->excerpt) {
      size_t k = EXCERPT_MAX - r->exlen < len ? EXCERPT_MAX - r->exlen : len;
      memcpy(r->excerpt + r->exlen, p, k);
      r->exlen += k;
    }
    for (size_t off = 0; off < len; ) {
      ssize_t w = write(r->out_fd, p + off, len - off);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        r->out_errno = errno;
        r->out_step = "write";
        return 0;
      }
      off += (size_t)w;
    }
    r->written += (curl_off_t)len;
    return len;
  }
  if (len > r->max_body - r->blen) {
    r->overflow = 1;
    return 0;
  }
  if (r->bcap - r->blen < len) {
    size_t cap = r->bcap ? r->bcap * 2 : 1024;
    if (!r->bcap) {
      /* a Content-Length sizes the buffer once (small ones stay small) */
      curl_off_t cl = -1;
      curl_easy_getinfo(r->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
      if (cl > 0 && (size_t)cl <= r->max_body) cap = (size_t)cl;
    }
    while (cap - r->blen < len) cap *= 2;
    char *b = realloc(r->body, cap);
    if (!b) { r->overflow = 2; return 0; }
    r->body = b;
    r->bcap = cap;
  }
  memcpy(r->body + r->blen, p, len);
  r->blen += len;
  return len;
}

/* One header line at a time; a status line starts a new response (after a
 * redirect or a 100 Continue), so only the last response's are kept. */
static size_t header_cb(char *p, size_t size, size_t n, void *ud) {
  hreq *r = ud;
  size_t len = size * n, l = len;
  while (l && (p[l - 1] == '\r' || p[l - 1] == '\n')) l--;
  if (l >= 5 && memcmp(p, "HTTP/", 5) == 0) {
    r->hlen = 0;
    r->reason[0] = 0;
    /* "HTTP/1.1 200 OK": the reason phrase after the code, if any */
    const char *s = memchr(p, ' ', l);
    if (s) {
      s++;
      while (s < p + l && *s >= '0' && *s <= '9') s++;
      while (s < p + l && *s == ' ') s++;
      size_t k = (size_t)(p + l - s);
      if (k >= sizeof r->reason) k = sizeof r->reason - 1;
      memcpy(r->reason, s, k);
      r->reason[k] = 0;
    }
    return len;
  }
  if (l == 0 || p[0] == ' ' || p[0] == '\t') return len; /* end / obs-fold */
  if (r->hlen + l + 1 > HEADERS_MAX) return len;
  if (r->hcap - r->hlen < l + 1) {
    size_t cap = r->hcap ? r->hcap * 2 : 512;
    while (cap - r->hlen < l + 1) cap *= 2;
    char *b = realloc(r->hbuf, cap);
    if (!b) return 0;
    r->hbuf = b;
    r->hcap = cap;
  }
  memcpy(r->hbuf + r->hlen, p, l);
  r->hbuf[r->hlen + l] = '\n';
  r->hlen += l + 1;
  return len;
}

static size_t read_cb(char *p, size_t size, size_t n, void *ud) {
  hreq *r = ud;
  for (;;) {
    ssize_t k = read(r->in_fd, p, size * n);
    if (k >= 0) return (size_t)k;
    if (errno != EINTR) return CURL_READFUNC_ABORT;
  }
}

static int seek_cb(void *ud, curl_off_t off, int origin) {
  hreq *r = ud;
  return lseek(r->in_fd, (off_t)off, origin) < 0 ? CURL_SEEKFUNC_FAIL
                                                 : CURL_SEEKFUNC_OK;
}

static void poll_close_cb(uv_handle_t *h) {
  free(h->data);
  S.npolls--;
  rbe_counts[RBE_COUNT_HANDLES]--;
}

static void poll_cb(uv_poll_t *h, int status, int events) {
  sockctx *c = h->data;
  int flags = 0, running;
  if (status < 0) flags = CURL_CSELECT_ERR;
  if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  curl_multi_socket_action(S.multi, c->fd, flags, &running);
  check_multi_info();
}

static int socket_cb(CURL *e, curl_socket_t s, int what, void *userp,
                     void *socketp) {
  CURLM *multi = userp;
  sockctx *c = socketp;
  (void)e;
  if (what == CURL_POLL_REMOVE) {
    if (c) {
      uv_poll_stop(&c->poll);
      uv_close((uv_handle_t *)&c->poll, poll_close_cb);
      curl_multi_assign(multi, s, NULL);
    }
    return 0;
  }
  if (!c) {
    c = malloc(sizeof *c);
    if (!c) return -1;
    if (uv_poll_init_socket(rbe_loop(), &c->poll, s) < 0) {
      free(c);
      return -1;
    }
    c->poll.data = c;
    c->fd = s;
    S.npolls++;
    rbe_counts[RBE_COUNT_HANDLES]++;
    curl_multi_assign(multi, s, c);
  }
  int ev = 0;
  if (what & CURL_POLL_IN) ev |= UV_READABLE;
  if (what & CURL_POLL_OUT) ev |= UV_WRITABLE;
  uv_poll_start(&c->poll, ev, poll_cb);
  return 0;
}

static void timeout_cb(uv_timer_t *t) {
  int running;
  (void)t;
  curl_multi_socket_action(S.multi, CURL_SOCKET_TIMEOUT, 0, &running);
  check_multi_info();
}

/* curl asks to be called back in ms (0: soon, never from here) */
static int timer_fn(CURLM *m, long ms, void *ud) {
  (void)m; (void)ud;
  if (ms < 0) uv_timer_stop(&S.timer);
  else uv_timer_start(&S.timer, timeout_cb, (uint64_t)ms, 0);
  return 0;
}

static CURLM *multi_new(void) {
  CURLM *m = curl_multi_init();
  if (!m) return NULL;
  curl_multi_setopt(m, CURLMOPT_SOCKETFUNCTION, socket_cb);
  curl_multi_setopt(m, CURLMOPT_SOCKETDATA, m);
  curl_multi_setopt(m, CURLMOPT_TIMERFUNCTION, timer_fn);
  S.nmulti++;
  return m;
}

/* ---- completion ---- */

static int status_ok(hreq *r) {
  if (!r->raise) return 1;
  if (r->nexpect) {
    for (int i = 0; i < r->nexpect; i++)
      if (r->expect[i] == r->status) return 1;
    return 0;
  }
  return r->status < 400;
}

/* The output file: renamed over out_path if the transfer and its status
 * were good, else deleted. */
static void finish_output(hreq *r) {
  int fd = r->out_fd;
  r->out_fd = -1;
  if (close(fd) < 0 && !r->out_errno) {
    r->out_errno = errno;
    r->out_step = "close";
  }
  if (r->result != CURLE_OK || r->out_errno || !status_ok(r)) return;
  if (rename(r->tmp_path, r->out_path) < 0) {
    r->out_errno = errno;
    r->out_step = "rename";
    return;
  }
  free(r->tmp_path);
  r->tmp_path = NULL;
  r->kept = 1;
}

static int req_push(lua_State *L, void *ud);

/* The transfer is over (or could not start): collect what the push needs
 * from the easy handle, give the handle back and wake the task. */
static void finish(hreq *r, CURLcode result) {
  CURL *e = r->easy;
  char *u = NULL;
  r->result = result;
  curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &r->status);
  curl_easy_getinfo(e, CURLINFO_EFFECTIVE_URL, &u);
  if (u) r->eff_url = strdup(u);
  curl_easy_getinfo(e, CURLINFO_REDIRECT_COUNT, &r->redirects);
  curl_easy_getinfo(e, CURLINFO_HTTP_VERSION, &r->http_version);
  curl_easy_getinfo(e, CURLINFO_NAMELOOKUP_TIME_T, &r->t_dns);
  curl_easy_getinfo(e, CURLINFO_CONNECT_TIME_T, &r->t_connect);
  curl_easy_getinfo(e, CURLINFO_APPCONNECT_TIME_T, &r->t_tls);
  curl_easy_getinfo(e, CURLINFO_STARTTRANSFER_TIME_T, &r->t_first);
  curl_easy_getinfo(e, CURLINFO_TOTAL_TIME_T, &r->t_total);
  curl_easy_getinfo(e, CURLINFO_REDIRECT_TIME_T, &r->t_redirect);
  if (r->state == R_ACTIVE) {
    curl_multi_remove_handle(S.multi, e);
    active_unlink(r);
  }
  r->easy = NULL;
  if (result == CURLE_OK) easy_put(e, r->dirty);
  else easy_drop(e);       /* a broken transfer: start the next one clean */
  curl_slist_free_all(r->headers);
  r->headers = NULL;
  if (r->in_fd >= 0) { close(r->in_fd); r->in_fd = -1; }
  if (r->out_fd >= 0) finish_output(r);
  r->state = R_DONE;
  gate *g = r->g;
  r->g = NULL;
  rbe_wait_done(r->w, req_push, r);
  if (g) gate_release(g);
}

static void check_multi_info(void) {
  CURLMsg *m;
  int left;
  while ((m = curl_multi_info_read(S.multi, &left))) {
    if (m->msg != CURLMSG_DONE) continue;
    hreq *r = NULL;
    CURLcode result = m->data.result;   /* m is gone after the remove */
    curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
    if (r) finish(r, result);
  }
}

/* cancel_fn: the task was cancelled or timed out */
static void req_cancel(void *ud) {
  hreq *r = ud;
  gate *g = r->g;
  r->g = NULL;
  if (r->state == R_QUEUED) {
    gate_unqueue(g, r);
    gate_maybe_free(g);
    g = NULL;
  } else if (r->state == R_ACTIVE) {
    curl_multi_remove_handle(S.multi, r->easy);
    active_unlink(r);
  }
  req_free(r);                /* drops the easy handle, deletes the .part */
  if (g) gate_release(g);
}

/* ---- results ---- */

static void push_lower(lua_State *L, const char *s, size_t n) {
  luaL_Buffer b;
  char *d = luaL_buffinitsize(L, &b, n);
  for (size_t i = 0; i < n; i++)
    d[i] = (s[i] >= 'A' && s[i] <= 'Z') ? (char)(s[i] + 32) : s[i];
  luaL_pushresultsize(&b, n);
}

/* Push headers (lower-case name -> value, repeats joined by ", ") and the
 * raw list {name1, value1, name2, value2, ...} in received order, from a
 * block of "Name: value\n" lines. */
static void push_headers(lua_State *L, const char *block, size_t len) {
  lua_createtable(L, 0, 8);          /* map */
  lua_createtable(L, 16, 0);         /* raw */
  int n = 0;
  const char *p = block, *end = block + len;
  while (p && p < end) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    const char *colon = memchr(p, ':', (size_t)(nl - p));
    if (colon && colon > p) {
      const char *ne = colon;
      while (ne > p && (ne[-1] == ' ' || ne[-1] == '\t')) ne--;
      const char *v = colon + 1, *ve = nl;
      while (v < ve && (*v == ' ' || *v == '\t')) v++;
      while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
      lua_pushlstring(L, p, (size_t)(ne - p));
      lua_rawseti(L, -2, ++n);
      lua_pushlstring(L, v, (size_t)(ve - v));
      lua_pushvalue(L, -1);
      lua_rawseti(L, -3, ++n);
      /* stack: map, raw, value */
      push_lower(L, p, (size_t)(ne - p));
      lua_pushvalue(L, -1);
      if (lua_rawget(L, -5) != LUA_TNIL) {
        /* stack: map, raw, value, lname, old */
        lua_pushliteral(L, ", ");
        lua_pushvalue(L, -4);
        lua_concat(L, 3);
      } else {
        lua_pop(L, 1);
        lua_pushvalue(L, -2);
      }
      lua_rawset(L, -5);
      lua_pop(L, 1);
    }
    p = nl + 1;
  }
}

static void push_transport_error(lua_State *L, hreq *r) {
  CURLcode c = r->result;
  if (r->overflow == 1) {
    rbe_error_push(L, "http", 0, "response body larger than max_body (%I "
                   "bytes); use output = path to stream it to a file",
                   (lua_Integer)r->max_body);
    rbe_error_code_str(L, "EMSGSIZE");
    return;
  }
  if (r->overflow == 2) {
    rbe_error_push(L, "http", 0, "out of memory reading the response body");
    rbe_error_code_str(L, "ENOMEM");
    return;
  }
  if (r->out_errno) {
    const char *name = strerrorname_np(r->out_errno);
    rbe_error_push(L, "http", 0, "output file %s (%s): %s", r->out_path,
                   r->out_step, strerror(r->out_errno));
    rbe_error_code_str(L, name ? name : "EIO");
    return;
  }
  const char *msg = r->errbuf[0] ? r->errbuf : curl_easy_strerror(c);
  rbe_error_push(L, c == CURLE_OPERATION_TIMEDOUT ? "timeout" : "http",
                 curle_retryable(c), "%s", msg);
  rbe_error_code_str(L, curle_name(c));
  lua_pushinteger(L, (lua_Integer)c);
  lua_setfield(L, -2, "curl_code");
}

/* push_fn: the response as 11 values, which lua/rbe/http.lua turns into
 * the response table (a Lua table constructor costs less than building it
 * field by field from here):
 *   status, reason, url, body | nil, size, headers block, timings,
 *   redirects, http_version, output path | nil, body excerpt | nil
 * where timings is string.pack("dddddd", dns, connect, tls, first_byte,
 * total, redirect) in seconds.  A failed transfer: nil, error object. */
static int req_push(lua_State *L, void *ud) {
  hreq *r = ud;
  if (!L) { req_free(r); return 0; }
  if (r->result != CURLE_OK || r->out_errno || r->overflow) {
    lua_pushnil(L);
    push_transport_error(L, r);
    req_free(r);
    return 2;
  }
  luaL_checkstack(L, 11, "http.request");
  lua_pushinteger(L, r->status);
  lua_pushstring(L, r->reason);
  lua_pushstring(L, r->eff_url ? r->eff_url : "");
  if (r->out_path) lua_pushnil(L);
  else lua_pushlstring(L, r->body ? r->body : "", r->blen);
  lua_pushinteger(L, r->out_path ? (lua_Integer)r->written
                                 : (lua_Integer)r->blen);
  lua_pushlstring(L, r->hbuf ? r->hbuf : "", r->hlen);
  double t[6] = {(double)r->t_dns / 1e6, (double)r->t_connect / 1e6,
                 (double)r->t_tls / 1e6, (double)r->t_first / 1e6,
                 (double)r->t_total / 1e6, (double)r->t_redirect / 1e6};
  lua_pushlstring(L, (const char *)t, sizeof t);
  lua_pushinteger(L, r->redirects);
  lua_pushstring(L, r->http_version == CURL_HTTP_VERSION_2_0 ? "2"
                  : r->http_version == CURL_HTTP_VERSION_1_0 ? "1.0"
                  : r->http_version == CURL_HTTP_VERSION_3 ? "3" : "1.1");
  if (r->out_path && r->kept) lua_pushstring(L, r->out_path);
  else lua_pushnil(L);
  if (r->out_path) lua_pushlstring(L, r->excerpt ? r->excerpt : "", r->exlen);
  else lua_pushnil(L);
  req_free(r);
  return 11;
}

/* ---- the request ---- */

/* A request's settings.  lua/rbe/http.lua sends only what differs from
 * these defaults (which it documents), so a plain GET's spec is just
 * {method, url} and its easy handle keeps the baseline options set by the
 * previous plain GET. */
#define DEF_TIMEOUT 30.0
#define DEF_CONNECT_TIMEOUT 10.0
#define DEF_MAX_REDIRECTS 10
#define DEF_MAX_BODY (64.0 * 1024 * 1024)

typedef struct {
  const char *method, *url, *body, *body_file, *output, *ca_file, *user;
  const char *password, *limit_key;
  size_t blen;
  double timeout, connect_timeout, max_body;
  long max_redirects;
  int limit, follow, verify, compressed, raise, has_headers, has_expect;
} spec;

static const char *spec_string(lua_State *L, const char *k, size_t *len) {
  if (lua_type(L, -1) != LUA_TSTRING)
    luaL_error(L, "http.request: spec.%s must be a string", k);
  return lua_tolstring(L, -1, len);  /* anchored by the spec table */
}

static double spec_number(lua_State *L, const char *k) {
  if (lua_type(L, -1) != LUA_TNUMBER)
    luaL_error(L, "http.request: spec.%s must be a number", k);
  return lua_tonumber(L, -1);
}

/* Read the spec table at index 1 in one pass over its (few) fields. */
static void read_spec(lua_State *L, spec *s) {
  memset(s, 0, sizeof *s);
  s->timeout = DEF_TIMEOUT;
  s->connect_timeout = DEF_CONNECT_TIMEOUT;
  s->max_body = DEF_MAX_BODY;
  s->max_redirects = DEF_MAX_REDIRECTS;
  s->follow = s->verify = s->compressed = s->raise = 1;
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
    if (!strcmp(k, "method")) s->method = spec_string(L, k, NULL);
    else if (!strcmp(k, "url")) s->url = spec_string(L, k, NULL);
    else if (!strcmp(k, "body")) s->body = spec_string(L, k, &s->blen);
    else if (!strcmp(k, "body_file")) s->body_file = spec_string(L, k, NULL);
    else if (!strcmp(k, "output")) s->output = spec_string(L, k, NULL);
    else if (!strcmp(k, "ca_file")) s->ca_file = spec_string(L, k, NULL);
    else if (!strcmp(k, "user")) s->user = spec_string(L, k, NULL);
    else if (!strcmp(k, "password")) s->password = spec_string(L, k, NULL);
    else if (!strcmp(k, "limit_key")) s->limit_key = spec_string(L, k, NULL);
    else if (!strcmp(k, "timeout")) s->timeout = spec_number(L, k);
    else if (!strcmp(k, "connect_timeout"))
      s->connect_timeout = spec_number(L, k);
    else if (!strcmp(k, "max_body")) s->max_body = spec_number(L, k);
    else if (!strcmp(k, "max_redirects"))
      s->max_redirects = (long)spec_number(L, k);
    else if (!strcmp(k, "limit")) s->limit = (int)spec_number(L, k);
    else if (!strcmp(k, "follow")) s->follow = lua_toboolean(L, -1);
    else if (!strcmp(k, "verify")) s->verify = lua_toboolean(L, -1);
    else if (!strcmp(k, "compressed")) s->compressed = lua_toboolean(L, -1);
    else if (!strcmp(k, "raise")) s->raise = lua_toboolean(L, -1);
    else if (!strcmp(k, "headers")) s->has_headers = lua_istable(L, -1);
    else if (!strcmp(k, "expect")) s->has_expect = lua_istable(L, -1);
    else luaL_error(L, "http.request: unknown spec field '%s'", k);
    lua_pop(L, 1);
  }
  if (!s->method || !s->url)
    luaL_error(L, "http.request: spec.method and spec.url required");
}

/* A plain GET: the easy handle's baseline options are all it needs. */
static int spec_is_baseline(const spec *s) {
  return strcmp(s->method, "GET") == 0 && !s->body && !s->body_file &&
         !s->output && !s->ca_file && !s->user && !s->has_headers &&
         s->timeout == DEF_TIMEOUT &&
         s->connect_timeout == DEF_CONNECT_TIMEOUT &&
         s->follow && s->max_redirects == DEF_MAX_REDIRECTS && s->verify &&
         s->compressed;
}

static void set_baseline(CURL *e) {
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  /* short: libcurl formats each header per request, character by
   * character (bench/bench_http.sh) */
  curl_easy_setopt(e, CURLOPT_USERAGENT, "rbe/" RBE_VERSION);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
  curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
  curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "gzip");
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)rbe_duration_ms(DEF_TIMEOUT));
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                   (long)rbe_duration_ms(DEF_CONNECT_TIMEOUT));
  curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(e, CURLOPT_MAXREDIRS, (long)DEF_MAX_REDIRECTS);
}

/* Everything a request sets beyond the baseline (it marks the handle
 * dirty: it is reset before it goes back to the pool). */
static void set_extras(CURL *e, hreq *r, const spec *s,
                       curl_off_t upload_size) {
  if (r->headers) curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
  if (!s->compressed) curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, NULL);
  if (s->timeout != DEF_TIMEOUT)
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)rbe_duration_ms(s->timeout));
  if (s->connect_timeout != DEF_CONNECT_TIMEOUT)
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                     (long)rbe_duration_ms(s->connect_timeout));
  if (!s->follow) curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(e, CURLOPT_MAXREDIRS, s->max_redirects);
  if (!s->verify) {
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  if (s->ca_file) curl_easy_setopt(e, CURLOPT_CAINFO, s->ca_file);
  if (s->user) {
    curl_easy_setopt(e, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
    curl_easy_setopt(e, CURLOPT_USERNAME, s->user);
    curl_easy_setopt(e, CURLOPT_PASSWORD, s->password ? s->password : "");
  }
  if (s->output) curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 128L * 1024);
  const char *m = s->method;
  int has_body = s->body || s->body_file;
  if (strcmp(m, "GET") == 0 && !has_body) {
    curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
  } else if (strcmp(m, "HEAD") == 0 && !has_body) {
    curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
  } else if (has_body || strcmp(m, "POST") == 0 || strcmp(m, "PUT") == 0 ||
             strcmp(m, "PATCH") == 0) {
    /* without a body too: an empty one, with Content-Length: 0 */
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    if (s->body_file) {
      curl_easy_setopt(e, CURLOPT_READFUNCTION, read_cb);
      curl_easy_setopt(e, CURLOPT_READDATA, r);
      curl_easy_setopt(e, CURLOPT_SEEKFUNCTION, seek_cb);
      curl_easy_setopt(e, CURLOPT_SEEKDATA, r);
      curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, upload_size);
    } else {
      /* the body string stays in the spec table, our argument, which the
       * task's stack keeps alive until the request is over */
      curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)s->blen);
      curl_easy_setopt(e, CURLOPT_POSTFIELDS, s->body ? s->body : "");
    }
    if (strcmp(m, "POST") != 0) curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, m);
  } else {
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, m);
  }
}

static void fail_setup(lua_State *L, hreq *r, const char *msg) {
  req_free(r);
  luaL_error(L, "http.request: %s", msg);
}

static int raise_file(lua_State *L, hreq *r, int err, const char *what,
                      const char *path) {
  req_free(r);
  const char *name = strerrorname_np(err);
  rbe_error_push(L, "fs", 0, "http.request: cannot %s %s: %s", what, path,
                 strerror(err));
  rbe_error_code_str(L, name ? name : "EIO");
  return lua_error(L);
}

/* "<dir>/.<base>.part-<8 random characters>" next to the output file */
static int open_temp(hreq *r, const char *path) {
  size_t n = strlen(path);
  const char *slash = strrchr(path, '/');
  size_t dlen = slash ? (size_t)(slash - path) + 1 : 0;
  size_t blen = n - dlen > 200 ? 200 : n - dlen;
  r->tmp_path = malloc(dlen + blen + 32);
  if (!r->tmp_path) return ENOMEM;
  for (int tries = 0; tries < 100; tries++) {
    unsigned char rnd[4];
    if (uv_random(NULL, NULL, rnd, sizeof rnd, 0, NULL) < 0)
      memset(rnd, tries, sizeof rnd);
    snprintf(r->tmp_path, dlen + blen + 32, "%.*s.%.*s.part-%02x%02x%02x%02x",
             (int)dlen, path, (int)blen, path + dlen, rnd[0], rnd[1], rnd[2],
             rnd[3]);
    r->out_fd = open(r->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                     0666);
    if (r->out_fd >= 0) return 0;
    if (errno != EEXIST) break;
  }
  int err = errno;
  free(r->tmp_path);
  r->tmp_path = NULL;
  return err;
}

/* core.request(spec) -> response | nil, err  [yields]
 * spec (built by lua/rbe/http.lua; absent fields take the defaults above):
 * method, url, headers (array of "Name: value"), body | body_file,
 * output, timeout, connect_timeout, follow, max_redirects, verify,
 * ca_file, user, password, max_body, compressed, expect (array of
 * statuses), raise, limit_key + limit (http.client max_per_host). */
static int l_request(lua_State *L) {
  spec s;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  read_spec(L, &s);
  rbe_wait *w = rbe_wait_new(L, "http.request");

  hreq *r = calloc(1, sizeof *r);
  if (!r) return luaL_error(L, "http.request: out of memory");
  r->in_fd = r->out_fd = -1;
  r->w = w;
  r->raise = s.raise;
  r->max_body = s.max_body > 0 ? (size_t)s.max_body : 0;
  if (s.has_expect) {
    lua_getfield(L, 1, "expect");
    int n = (int)luaL_len(L, -1);
    r->expect = malloc((size_t)(n ? n : 1) * sizeof *r->expect);
    if (!r->expect) fail_setup(L, r, "out of memory");
    for (int i = 0; i < n; i++) {
      lua_rawgeti(L, -1, i + 1);
      r->expect[i] = (int)lua_tointeger(L, -1);
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
    r->nexpect = n;
  }
  if (s.has_headers) {
    lua_getfield(L, 1, "headers");
    int n = (int)luaL_len(L, -1);
    for (int i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      const char *h = lua_tostring(L, -1);
      if (!h) fail_setup(L, r, "spec.headers must hold strings");
      struct curl_slist *l = curl_slist_append(r->headers, h);
      if (!l) fail_setup(L, r, "out of memory");
      r->headers = l;
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  curl_off_t upload_size = -1;
  if (s.body_file) {
    struct stat st;
    r->in_fd = open(s.body_file, O_RDONLY | O_CLOEXEC);
    if (r->in_fd < 0)
      return raise_file(L, r, errno, "open body_file", s.body_file);
    if (fstat(r->in_fd, &st) < 0)
      return raise_file(L, r, errno, "stat body_file", s.body_file);
    if (!S_ISREG(st.st_mode))
      return raise_file(L, r, EINVAL, "upload (not a regular file)",
                        s.body_file);
    upload_size = (curl_off_t)st.st_size;
  }
  if (s.output) {
    r->out_path = strdup(s.output);
    r->excerpt = malloc(EXCERPT_MAX);
    if (!r->out_path || !r->excerpt) fail_setup(L, r, "out of memory");
    int err = open_temp(r, s.output);
    if (err) return raise_file(L, r, err, "create a temp file for output",
                               s.output);
  }
  gate *g = NULL;
  if (s.limit_key && s.limit > 0) {
    g = gate_get(s.limit_key, s.limit);
    if (!g) fail_setup(L, r, "out of memory");
  }
  int fresh;
  CURL *e = easy_get(&fresh);
  if (!e) {
    if (g) gate_maybe_free(g);
    fail_setup(L, r, "curl_easy_init failed");
  }
  r->easy = e;
  if (fresh) set_baseline(e);
  curl_easy_setopt(e, CURLOPT_PRIVATE, r);
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
  curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
  curl_easy_setopt(e, CURLOPT_URL, s.url);
  if (!spec_is_baseline(&s)) {
    r->dirty = 1;
    set_extras(e, r, &s, upload_size);
  }

  /* past this point nothing raises */
  r->g = g;
  if (g && g->active >= g->limit) {
    r->state = R_QUEUED;
    if (g->qtail) g->qtail->qnext = r;
    else g->qhead = r;
    g->qtail = r;
    S.nqueued++;
  } else {
    if (g) g->active++;
    int mc = req_start(r);
    if (mc) {
      if (g) { r->g = NULL; g->active--; gate_maybe_free(g); }
      req_free(r);
      return luaL_error(L, "http.request: curl_multi_add_handle: %s",
                        curl_multi_strerror((CURLMcode)mc));
    }
  }
  return rbe_wait_yield(L, w, req_cancel, r);
}

/* core.parse_headers(block) -> map, list: the header lines of a response
 * ("Name: value\n"...) as {lower-case name = value, repeats joined with
 * ", "} and {name1, value1, name2, value2, ...} in order */
static int l_parse_headers(lua_State *L) {
  size_t n;
  const char *p = luaL_checklstring(L, 1, &n);
  push_headers(L, p, n);
  return 2;
}

/* core.close_idle() -> boolean: close every cached idle connection (a new
 * multi handle replaces the old one); false while requests are in flight */
static int l_close_idle(lua_State *L) {
  if (S.nactive || S.nqueued) { lua_pushboolean(L, 0); return 1; }
  CURLM *m = multi_new();
  if (!m) return luaL_error(L, "http.close_idle: curl_multi_init failed");
  curl_multi_cleanup(S.multi);
  S.multi = m;
  uv_timer_stop(&S.timer);
  lua_pushboolean(L, 1);
  return 1;
}

/* core._stats() -> {active, queued, polls, easy, pooled, gates, multis} */
static int l_stats(lua_State *L) {
  long gates = 0;
  for (gate *g = S.gates; g; g = g->next) gates++;
  lua_createtable(L, 0, 7);
  lua_pushinteger(L, S.nactive);
  lua_setfield(L, -2, "active");
  lua_pushinteger(L, S.nqueued);
  lua_setfield(L, -2, "queued");
  lua_pushinteger(L, S.npolls);
  lua_setfield(L, -2, "polls");
  lua_pushinteger(L, S.neasy);
  lua_setfield(L, -2, "easy");
  lua_pushinteger(L, S.npool);
  lua_setfield(L, -2, "pooled");
  lua_pushinteger(L, gates);
  lua_setfield(L, -2, "gates");
  lua_pushinteger(L, S.nmulti);
  lua_setfield(L, -2, "multis");
  return 1;
}

/* ---- life cycle ---- */

static void timer_close_cb(uv_handle_t *h) { (void)h; }

/* At lua_close: every task is over, so nothing is in flight; drop what
 * is left anyway, then the pool, the multi handle and the timer. */
static int state_gc(lua_State *L) {
  (void)L;
  if (!S.inited) return 0;
  S.inited = 0;
  while (S.active) {
    hreq *r = S.active;
    curl_multi_remove_handle(S.multi, r->easy);
    active_unlink(r);
    req_free(r);
  }
  while (S.gates) {
    gate *g = S.gates;
    while (g->qhead) {
      hreq *r = g->qhead;
      g->qhead = r->qnext;
      req_free(r);
    }
    S.gates = g->next;
    free(g);
  }
  while (S.npool) easy_drop(S.pool[--S.npool]);
  curl_multi_cleanup(S.multi);
  S.multi = NULL;
  uv_timer_stop(&S.timer);
  uv_close((uv_handle_t *)&S.timer, timer_close_cb);
  curl_global_cleanup();
  return 0;
}

static const luaL_Reg http_funcs[] = {
  {"request", l_request},
  {"close_idle", l_close_idle},
  {"parse_headers", l_parse_headers},
  {"_stats", l_stats},
  {NULL, NULL}
};

int luaopen_rbe_http(lua_State *L) {
  if (!S.inited) {
    /* close callbacks may run after lua_close has dlclose'd us */
    Dl_info info;
    if (dladdr((void *)luaopen_rbe_http, &info) && info.dli_fname)
      dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
      return luaL_error(L, "rbe.http: curl_global_init failed");
    S.multi = multi_new();
    if (!S.multi) return luaL_error(L, "rbe.http: curl_multi_init failed");
    uv_timer_init(rbe_loop(), &S.timer);  /* internal: not counted */
    S.inited = 1;
    lua_newuserdatauv(L, 0, 0);
    luaL_newmetatable(L, STATE_MT);
    lua_pushcfunction(L, state_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &S);
  }
  luaL_newlib(L, http_funcs);
  lua_createtable(L, 0, 2);
  curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
  lua_pushstring(L, v->version);
  lua_setfield(L, -2, "libcurl");
  /* libcurl's TLS library: "OpenSSL/3.0.19" -> openssl = "3.0.19" */
  const char *slash = v->ssl_version ? strchr(v->ssl_version, '/') : NULL;
  if (slash && slash > v->ssl_version) {
    push_lower(L, v->ssl_version, (size_t)(slash - v->ssl_version));
    lua_pushstring(L, slash + 1);
    lua_settable(L, -3);
  }
  lua_setfield(L, -2, "_versions");
  return 1;
}
