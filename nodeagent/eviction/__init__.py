"""Node-pressure eviction, as kubelet's eviction manager: the hard thresholds
(``memory.available``, ``nodefs.available``, ``nodefs.inodesFree``,
``imagefs.available``, ``imagefs.inodesFree``, ``pid.available``), the node
conditions they drive (MemoryPressure, DiskPressure, PIDPressure), reclaiming node
resources first (dead containers, unused images), then evicting one pod per round in
kubelet's order. Static pods are never evicted.

``signals`` reads the machine, ``thresholds`` parses the settings, ``ranking`` orders
pods, ``manager`` runs the loop. The manager knows nothing of Docker or the API: it gets
observations, pods and their usage, and callbacks to reclaim and to evict.
"""

from nodeagent.eviction.manager import EvictionManager, PodUsage
from nodeagent.eviction.thresholds import DEFAULT_EVICTION_HARD, Threshold, parse_thresholds

__all__ = ["EvictionManager", "PodUsage", "Threshold", "parse_thresholds", "DEFAULT_EVICTION_HARD"]
