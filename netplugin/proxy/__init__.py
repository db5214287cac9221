"""kube-proxy-style service proxy in nftables, programmed over netlink.

Public API: ``ServiceProxy``, ``cleanup``, ``HostPortMapping``, ``PodRoutes``,
``StandaloneServices`` (see docs/PROXY.md).
"""

from .model import HostPortMapping, ServiceError
from .proxier import ProxySyncError, ServiceProxy, cleanup
from .routes import PodRoutes
from .standalone import StandaloneServices

__all__ = ["HostPortMapping", "PodRoutes", "ProxySyncError", "ServiceError", "ServiceProxy",
           "StandaloneServices", "cleanup"]
