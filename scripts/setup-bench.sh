#!/usr/bin/env bash
# Packages the benchmarks need beyond scripts/setup.sh (run that first): podman, for
# bench/pod_lifecycle.py's `podman kube play` contender. Idempotent; run as root.
# Nothing under /etc/containers is changed: the benchmark gives podman a private
# containers.conf (CONTAINERS_CONF) and imports its images from the local Docker.
set -euo pipefail

log() { printf '[setup-bench] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "setup-bench.sh must run as root (it installs packages)" >&2; exit 1; }

PACKAGES=(podman)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
log "podman $(podman --version | awk '{print $3}') ready"
