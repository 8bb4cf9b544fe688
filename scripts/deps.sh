#!/bin/sh
# Install the Debian 12 packages rbe needs to build, test and run its demo.
# Idempotent and non-interactive: does nothing when all are present.
set -eu
PKGS="build-essential cmake pkg-config
liblua5.4-dev lua5.4 lua-cjson-dev lua-busted
libuv1-dev libpq-dev libcurl4-openssl-dev libhiredis-dev libedit-dev
postgresql postgresql-client redis-server redis-tools procps git openssl tmux"
# node runs the local HTTP test servers and the npm-based fixtures; any
# node will do (Debian's nodejs when none is installed)
command -v node >/dev/null 2>&1 || PKGS="$PKGS nodejs npm"

missing=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done
npm_fixtures() {
  # the npm packages of the test fixtures and the drill (bullmq, bull, pm2)
  "$(dirname "$0")/../tests/fixtures/npm-install.sh"
}
if [ -z "$missing" ]; then npm_fixtures; exit 0; fi

echo "rbe deps: installing$missing"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "rbe deps: need root (or sudo) to install:$missing" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# shellcheck disable=SC2086
$SUDO apt-get install -y -q --no-install-recommends $missing
npm_fixtures
