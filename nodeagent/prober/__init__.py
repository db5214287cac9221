"""Container probes and lifecycle hooks (kubelet's pkg/kubelet/prober and lifecycle).

This package owns:

* ``handlers``: running one exec / httpGet / tcpSocket / grpc check against a
  container, each cut off at its timeout (shared with the lifecycle hooks);
* ``results``: the latest liveness, readiness and startup result per container
  instance (keyed by container id, so a restarted container starts afresh);
* ``worker``: one asyncio task per container per probe type, with kubelet's timing
  (initialDelaySeconds, periodSeconds, timeoutSeconds, success/failure thresholds)
  and gating (the startup probe gates the other two);
* ``manager``: the kubelet-facing ``ProbeManager``: adds and removes workers as pods
  come and go, learns container ids from each published pod status, turns results into
  ``started``/``ready`` for the status and into kill requests for failed liveness and
  startup probes, and kicks the pod worker when a result changes;
* ``hooks``: postStart and preStop (exec, httpGet, sleep);
* ``kubelet``: the few calls the kubelet makes into this package (what
  ``compute_pod_actions`` and ``generate_pod_status`` get, and the hook steps of
  starting and stopping a container).

Nothing here touches Docker except through ``RuntimeService.exec_sync``, and nothing
here changes a container: killing after a failed liveness probe is the pod worker's
job (``compute_pod_actions`` gets the kill requests), so restarts follow the restart
policy and back-off like any other exit.
"""

from nodeagent.prober.hooks import HookRunner
from nodeagent.prober.manager import ProbeManager
from nodeagent.prober.results import ProbeType, Result

__all__ = ["HookRunner", "ProbeManager", "ProbeType", "Result"]
