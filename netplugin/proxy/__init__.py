"""kube-proxy-style service proxy in nftables, programmed over netlink.

Public API: ``ServiceProxy``, ``cleanup``, ``HostPortMapping``, ``PodRoutes``,
``StandaloneServices`` (see docs/PROXY.md).
"""

from .model import HostPortMapping, ServiceError
from .proxier import ProxySyncError, ServiceProxy, cleanup

__all__ = ["HostPortMapping", "ServiceError", "ServiceProxy", "ProxySyncError", "cleanup"]
