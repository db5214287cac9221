"""Cluster mode: the agent as a Kubernetes node (API pod source, status manager, Node
registration and Lease, admission, mirror pods, configMap/secret references, events)."""
