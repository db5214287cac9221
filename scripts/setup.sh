#!/usr/bin/env bash
# Sets up a fresh Debian machine (as root) for nodeagent: system packages, a running
# Docker engine, the project's virtualenv, and the local images (no registry needed).
# Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "setup.sh must run as root (it installs packages and starts dockerd)" >&2; exit 1; }

PACKAGES=(docker.io iptables nftables iproute2 conntrack busybox-static gcc libc6-dev
          python3 python3-venv python3-dev ca-certificates docker-registry prometheus
          procps iputils-ping util-linux curl chromium
          systemd)  # systemd-analyze: the unit is verified by the tests (no systemd as PID 1)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# No systemd as PID 1 on these machines: start dockerd ourselves when it is not running.
if ! docker version >/dev/null 2>&1; then
  log "starting dockerd (log: /var/log/nodeagent-dockerd.log)"
  # Debian's registry package starts nothing without systemd; make sure no stale pid blocks.
  rm -f /var/run/docker.pid
  nohup dockerd >/var/log/nodeagent-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker version >/dev/null 2>&1 && break; sleep 1; done
  docker version >/dev/null 2>&1 || { echo "dockerd did not come up; see /var/log/nodeagent-dockerd.log" >&2; exit 1; }
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating virtualenv .venv"
  "$PY" -m venv .venv
fi
log "installing nodeagent into .venv"
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

log "building local images"
.venv/bin/python -m runtime.pause_image
bash scripts/build-busybox-image.sh busybox:1.35
log "ready"
