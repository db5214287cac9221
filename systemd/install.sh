#!/usr/bin/env bash
# Installs nodeagent as a systemd service from this checkout.
#   sudo bash systemd/install.sh [--manifest-dir /etc/nodeagent/manifests]
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
manifests=/etc/nodeagent/manifests
[ "${1:-}" = "--manifest-dir" ] && manifests=$2
[ "$(id -u)" = 0 ] || { echo "install.sh must run as root" >&2; exit 1; }
command -v systemctl >/dev/null || { echo "systemd is not running here; run 'nodeagent run' directly" >&2; exit 1; }
mkdir -p /opt/nodeagent /etc/nodeagent "$manifests"
cp -a "$src/." /opt/nodeagent/
(cd /opt/nodeagent && bash scripts/setup.sh)
[ -f /etc/nodeagent/config.yaml ] || printf 'manifest-dir: %s\n' "$manifests" > /etc/nodeagent/config.yaml
# Writes the unit (ExecStart pointing at this installation), enables and starts it.
/opt/nodeagent/.venv/bin/nodeagent install-service --config /etc/nodeagent/config.yaml
echo "nodeagent installed; manifests go in $manifests; status: curl 127.0.0.1:10255/healthz"
