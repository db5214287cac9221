"""The kubelet core: what turns a desired pod into running containers and back.

Owns pod workers (one serialized task per pod uid, syncing → terminating →
terminated), the PLEG (Docker events with a relist as safety net), the pure decision
of what to do to a pod (``podactions``) and how to report it (``podstatus``), container
configuration from a pod spec, pod volumes, and the kubelet's events. It talks to the
runtime and the pod network only through ``runtime.types`` and ``netplugin.types``;
it knows nothing of where pods come from (``standalone``, ``cluster``).
"""
