"""nodeagent: a Kubernetes node agent (kubelet, Docker runtime shim, service proxy)."""

__version__ = "0.1.0"
