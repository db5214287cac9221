"""The node's HTTP endpoints: the plain status server (``/healthz``, ``/pods``, ...)."""
