"""The Kubernetes API types as the node reads them: the plain-JSON shape every object
must have (``shape``), pod spec defaulting and validation with the API server's limits
(``podspec``), the types of the Service fields the proxy reads (``servicespec``), and
resource quantities. Pure functions over plain dicts; no I/O."""
