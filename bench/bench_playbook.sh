#!/bin/sh
# bench/bench_playbook.sh RBE BINDIR: playbook engine overhead, and the
# same 20 local commands under Ansible (installed from Debian if missing).
set -e
RBE=$(readlink -f "$1")
if ! command -v ansible-playbook >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ansible-core >/dev/null 2>&1 \
    || echo "(could not install ansible-core; skipping the Ansible comparison)"
fi
"$RBE" "$(dirname "$0")/playbook.lua" "$RBE" "${PLAYBOOK_STEPS:-1000}"
