#!/usr/bin/env bash
# Runs systemd/nodeagent.service under a real systemd (systemd-nspawn, Debian
# systemd-container) on a machine without systemd as PID 1, and checks what the unit
# promises: Type=notify readiness with STATUS=, the hardening leaving netlink, nftables
# and the Docker socket usable, and the watchdog restarting a stopped (SIGSTOP) agent.
#   sudo bash systemd/check-under-systemd.sh
# The container boots this host's /usr with an empty, volatile root and a private network
# namespace (the agent's bridge and nftables table live and die there); Docker's own units
# are masked inside so only the host's engine (bind-mounted socket) is used. Pods cannot get
# a network here (the container's PID namespace hides their /proc/<pid>/ns/net), so no pod is
# started. Everything is removed at the end.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
command -v systemd-nspawn >/dev/null || { echo "needs systemd-nspawn (apt-get install systemd-container)" >&2; exit 2; }
work=$(mktemp -d /tmp/nodeagent-nspawn-XXXX)
name=na$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n')
pyhome=$(dirname "$(dirname "$(readlink -f "$src/.venv/bin/python3")")")
cat > "$work/config.yaml" <<CFG
manifest-dir: /var/lib/nodeagent-manifests
root-dir: /var/lib/nodeagent
node-name: $name
bridge-name: $name
proxy-table: $name
pod-cidr: 10.251.77.0/24
CFG
"$src/.venv/bin/python" - "$work" "$src" <<'PY'
import sys
sys.path.insert(0, sys.argv[2])
from nodeagent.systemd import render_unit
unit = render_unit("/etc/nodeagent/config.yaml", sys.argv[2] + "/.venv/bin/nodeagent")
open(sys.argv[1] + "/nodeagent.service", "w").write(unit.replace("WatchdogSec=30s", "WatchdogSec=5s"))
PY
mask=()
for u in docker.service docker.socket containerd.service systemd-networkd-wait-online.service; do
  mask+=(--bind-ro=/dev/null:/etc/systemd/system/$u)
done
systemd-nspawn --keep-unit --register=no --volatile=yes -D / --private-network --machine="$name" \
  --console=pipe --bind-ro="$src" --bind-ro="$pyhome" --bind=/var/run/docker.sock "${mask[@]}" \
  --bind-ro="$work/nodeagent.service:/etc/systemd/system/nodeagent.service" \
  --bind-ro="$work/config.yaml:/etc/nodeagent/config.yaml" -b >"$work/nspawn.log" 2>&1 &
nspawn=$!
cleanup() {
  kill -TERM "$nspawn" 2>/dev/null || true
  wait "$nspawn" 2>/dev/null || true
  rmdir /run/systemd/nspawn/propagate/"$name" /run/systemd/nspawn/propagate /run/systemd/nspawn \
    /run/systemd/nspawn-root 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
init=""
booted=""
for _ in $(seq 120); do
  init=$(ps --ppid "$nspawn" -o pid= | tr -d ' ' || true)
  if [ -n "$init" ]; then
    booted=$(nsenter -t "$init" -a systemctl is-system-running 2>/dev/null || true)
    case "$booted" in running|degraded) break ;; esac
  fi
  sleep 0.5
done
case "$booted" in running|degraded) ;; *) echo "FAIL: the container did not boot ($booted)"; cat "$work/nspawn.log"; exit 1 ;; esac
inside() { nsenter -t "$init" -a "$@"; }
inside mkdir -p /var/lib/nodeagent-manifests
inside systemctl start nodeagent.service        # Type=notify: returns once READY=1 arrived
state=$(inside systemctl show nodeagent -p ActiveState --value)
status=$(inside systemctl show nodeagent -p StatusText --value)
echo "after start: ActiveState=$state StatusText='$status'"
[ "$state" = active ] && [[ "$status" == "pods running: 0; last sync:"* ]] || { echo "FAIL: not ready"; exit 1; }
inside journalctl -u nodeagent -o cat --no-pager | grep -E "pod network started|proxy synced|container runtime reachable" | head -3
main=$(inside systemctl show nodeagent -p MainPID --value)
inside kill -STOP "$main"                        # a blocked agent stops pinging the watchdog
sleep 8   # WatchdogSec=5s: killed with SIGABRT, then restarted after RestartSec=5
for _ in $(seq 60); do
  [ "$(inside systemctl show nodeagent -p ActiveState --value)" = active ] && \
    [ "$(inside systemctl show nodeagent -p NRestarts --value)" -ge 1 ] && break
  sleep 0.5
done
result=$(inside journalctl -u nodeagent -o cat --no-pager | grep -c "Watchdog timeout" || true)
restarts=$(inside systemctl show nodeagent -p NRestarts --value)
state=$(inside systemctl show nodeagent -p ActiveState --value)
echo "after SIGSTOP: watchdog timeouts=$result NRestarts=$restarts ActiveState=$state"
[ "$result" -ge 1 ] && [ "$restarts" -ge 1 ] && [ "$state" = active ] || { echo "FAIL: watchdog"; exit 1; }
inside systemctl stop nodeagent.service
echo "OK: Type=notify, STATUS=, hardening and watchdog restart work under systemd $(inside systemctl --version | head -1 | cut -d' ' -f2)"
