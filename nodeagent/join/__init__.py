"""Joining a cluster with a bootstrap token (kubeadm's discovery + kubelet's TLS bootstrap).

    token.py       token and CA-pin parsing (no network; secrets never in repr/logs)
    discovery.py   cluster-info read without credentials, JWS check, CA pin, re-read
                   over the pinned CA
    csr.py         key + CSR generation, CSR creation and waiting for its certificate
                   (shared with certificate rotation, nodeagent/certificate/)
    files.py       credential layout under root-dir and atomic 0600 writes
    flow.py        `nodeagent join` itself: the steps above in order, bounded by a timeout
"""
