#!/bin/sh
# bench/bench_http.sh RBE BINDIR: rbe.http's throughput.  Starts a private
# nginx (never the system's service) on a random 127.0.0.1 port with a temp
# prefix serving a small JSON /health, then times HTTP_N (20,000) GETs
# with HTTP_CONC (64) in flight from: wrk with HTTP_CONC connections (the
# server's limit), the C floor (BINDIR/rbe-http-floor: libcurl multi on
# libuv, bench/http_floor.c) and rbe (bench/http.lua, which also times one
# curl process per request through rbe.proc and prints the ratios).
# Knobs: HTTP_N, HTTP_CONC, HTTP_ROUNDS (3), HTTP_WRK_SECS (5), HTTP_CURL_N
# (200).
# Installs the Debian packages nginx and wrk when missing (bench only).
# Prints figures, never passes or fails on them.
set -eu
RBE=${1:-build/bin/rbe}
BIN=${2:-$(dirname "$RBE")}
HERE=$(cd "$(dirname "$0")" && pwd)
N=${HTTP_N:-20000}
CONC=${HTTP_CONC:-64}
WRK_SECS=${HTTP_WRK_SECS:-5}

find_nginx() {
  command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true
}

# ---- packages: nginx and wrk, installed without starting any service
missing=""
[ -n "$(find_nginx)" ] || missing="$missing nginx"
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
if [ -n "$missing" ]; then
  echo "bench_http: installing$missing"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "bench_http: need root (or sudo) to install:$missing; skipped" >&2
      exit 0
    fi
  fi
  # the nginx package would start the system service on port 80: forbid
  # service starts for the length of the install (unless a policy exists)
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
  fi
  export DEBIAN_FRONTEND=noninteractive
  rc=0
  $SUDO apt-get update -q >/dev/null || rc=$?
  # shellcheck disable=SC2086
  [ "$rc" -ne 0 ] || $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null || rc=$?
  [ -n "$policy" ] && $SUDO rm -f "$policy"
  if [ "$rc" -ne 0 ]; then
    echo "bench_http: could not install$missing; skipped" >&2
    exit 0
  fi
fi
NGINX=$(find_nginx)

# ---- the floor program (bench/run.sh built it already; a no-op then)
cmake --build "$(dirname "$BIN")" --target floors >/dev/null

# ---- a private nginx
TMP=$(mktemp -d /tmp/rbe-bench-http.XXXXXX)
stop_nginx() {
  if [ -s "$TMP/nginx.pid" ]; then
    pid=$(cat "$TMP/nginx.pid")
    kill "$pid" 2>/dev/null || true
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    kill -9 "$pid" 2>/dev/null || true
  fi
}
cleanup() { stop_nginx; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

write_conf() {
  cat > "$TMP/nginx.conf" <<EOF
worker_processes 1;
daemon on;
pid $TMP/nginx.pid;
error_log $TMP/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $TMP/body;
  proxy_temp_path $TMP/proxy;
  fastcgi_temp_path $TMP/fastcgi;
  uwsgi_temp_path $TMP/uwsgi;
  scgi_temp_path $TMP/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  server {
    listen 127.0.0.1:$1;
    location = /health {
      default_type application/json;
      return 200 '{"status":"ok","checks":{"db":"ok","queue":"ok"}}';
    }
  }
}
EOF
}

PORT=""
for _ in 1 2 3 4 5 6 7 8 9 10; do
  p=$(( 20000 + $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % 12000 ))
  # something already answers there: try another port
  if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$p/" 2>/dev/null; then continue; fi
  write_conf "$p"
  if "$NGINX" -p "$TMP" -c "$TMP/nginx.conf" -e "$TMP/error.log" 2>/dev/null; then
    PORT=$p
    break
  fi
done
if [ -z "$PORT" ]; then
  echo "bench_http: nginx did not start:" >&2
  cat "$TMP/error.log" >&2 2>/dev/null || true
  exit 1
fi
URL="http://127.0.0.1:$PORT/health"
i=0
until curl -sf -o /dev/null "$URL"; do
  i=$((i + 1))
  if [ $i -gt 50 ]; then echo "bench_http: nginx does not answer" >&2; exit 1; fi
  sleep 0.1
done

# ---- baselines, then rbe.  The floor and rbe alternate, best of
# HTTP_ROUNDS each, so a busy moment of the machine hits both alike.
ROUNDS=${HTTP_ROUNDS:-3}
wrk_rate=$(wrk -t1 -c"$CONC" -d"${WRK_SECS}s" "$URL" | awk '/^Requests\/sec:/ { printf "%d", $2 }')
floor_rate=0
rbe_rate=0
i=0
while [ $i -lt "$ROUNDS" ]; do
  i=$((i + 1))
  r=$("$BIN/rbe-http-floor" "$URL" "$N" "$CONC" | sed -n 's/.*rate=\([0-9]*\).*/\1/p')
  [ "${r:-0}" -gt "$floor_rate" ] && floor_rate=$r
  r=$("$RBE" "$HERE/http.lua" rate "$URL" "$N" "$CONC")
  [ "${r:-0}" -gt "$rbe_rate" ] && rbe_rate=$r
done
"$RBE" "$HERE/http.lua" report "$URL" "$N" "$CONC" "$wrk_rate" "$floor_rate" "$rbe_rate"
echo "  (nginx $("$NGINX" -v 2>&1 | sed 's|.*/||'), 1 worker, port $PORT; wrk -t1 -c$CONC -d${WRK_SECS}s; floor and rbe best of $ROUNDS, alternating)"
