"""Kubernetes API access for the agent: kubeconfig loading, a thin aiohttp client with
rate limiting and retries, and list+watch reflectors/informers. See docs/API_CLIENT.md."""

from .client import (ApiConnectionError, ApiError, Backoff, KubeClient, PatchType, RateLimiter,
                     WatchEvent, WatchStream)
from .kubeconfig import KubeConfig, KubeConfigError, load_kubeconfig
from .resources import Resource
from .watch import Informer, Reflector, object_key

__all__ = [
    "ApiConnectionError", "ApiError", "Backoff", "Informer", "KubeClient", "KubeConfig",
    "KubeConfigError", "PatchType", "RateLimiter", "Reflector", "Resource", "WatchEvent",
    "WatchStream", "load_kubeconfig", "object_key",
]
