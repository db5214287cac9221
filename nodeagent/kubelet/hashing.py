"""Stable hashes of spec pieces, recorded on Docker objects as labels."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(obj: Any) -> str:
    """A short hash of a JSON-able value; key order does not matter."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def container_hash(container: dict) -> str:
    """The hash kubelet-style restarts compare: a container whose spec hash differs
    from the running instance's label is restarted with the new spec."""
    return stable_hash(container)
