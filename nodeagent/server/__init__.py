"""The node's HTTP endpoints: the plain status server (``/healthz``, ``/pods``, ...) and
the HTTPS node API (kubelet's port 10250: authn/authz, container logs, exec, attach,
port-forward over SPDY/3.1 and WebSocket)."""
