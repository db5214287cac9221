"""The node's certificates after joining (kubelet's pkg/kubelet/certificate): the client
certificate renewed through a new CSR at a jittered 70-90 % of its lifetime, and the
serving certificate for the node API from the kubernetes.io/kubelet-serving signer.
Files live in <root-dir>/pki/ (nodeagent/join/files.py)."""
