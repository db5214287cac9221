"""A Kubernetes API server for tests (HTTPS, in-memory), also runnable standalone:

    python -m tests.controlplane --port 6443 --state-dir /tmp/cp

prints the admin kubeconfig path. See docs/API_CLIENT.md for what it implements."""

from .api import ADMIN, Options, RecordedWrite, UserInfo
from .errors import ApiStatusError
from .resources import RESOURCES, ResourceType
from .server import ControlPlane

__all__ = ["ADMIN", "ApiStatusError", "ControlPlane", "Options", "RESOURCES", "RecordedWrite",
           "ResourceType", "UserInfo"]
