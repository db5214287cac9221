"""The Kubernetes API types as the node reads them: pod spec defaulting and
validation with the API server's limits, and resource quantities. Pure functions over
plain dicts; no I/O."""
