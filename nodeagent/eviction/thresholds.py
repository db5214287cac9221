"""Eviction thresholds in kubelet's ``--eviction-hard`` syntax:
``memory.available<100Mi,nodefs.available<10%``."""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.api.quantity import QuantityError, parse_quantity

# kubelet's Linux defaults, plus pid.available<10% (kubelet has none; the node has
# reported PIDPressure at 10 % of pid_max since cluster mode landed).
DEFAULT_EVICTION_HARD = ("memory.available<100Mi,nodefs.available<10%,nodefs.inodesFree<5%,"
                         "imagefs.available<15%,imagefs.inodesFree<5%,pid.available<10%")

# signal -> the node condition it drives
SIGNALS = {
    "memory.available": "MemoryPressure",
    "nodefs.available": "DiskPressure",
    "nodefs.inodesFree": "DiskPressure",
    "imagefs.available": "DiskPressure",
    "imagefs.inodesFree": "DiskPressure",
    "pid.available": "PIDPressure",
}


@dataclass(frozen=True)
class Threshold:
    signal: str
    quantity: int | None = None  # absolute (bytes, inodes, pids)
    percentage: float | None = None  # of capacity, 0..1

    def value(self, capacity: int) -> float:
        """The threshold as an absolute amount for a resource of ``capacity``."""
        if self.quantity is not None:
            return float(self.quantity)
        return (self.percentage or 0.0) * capacity

    def met(self, available: int, capacity: int) -> bool:
        return available < self.value(capacity)

    def describe(self) -> str:
        if self.quantity is not None:
            return _format_amount(self.signal, self.quantity)
        return f"{(self.percentage or 0) * 100:g}%"

    @property
    def condition(self) -> str:
        return SIGNALS[self.signal]


def _format_amount(signal: str, amount: float) -> str:
    if signal.endswith("inodesFree") or signal == "pid.available":
        return str(int(amount))
    amount = int(amount)
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if amount >= size and amount % size == 0:
            return f"{amount // size}{unit}"
    return f"{amount // 1024}Ki" if amount >= 1024 else str(amount)


def format_available(signal: str, amount: float) -> str:
    """How kubelet's messages show an amount: Ki for bytes, plain for counts."""
    if signal.endswith("inodesFree") or signal == "pid.available":
        return str(int(amount))
    return f"{int(amount) // 1024}Ki"


def parse_thresholds(text: str) -> list[Threshold]:
    """Parse ``signal<quantity`` items; a ValueError names the bad item."""
    thresholds: dict[str, Threshold] = {}
    for item in (p.strip() for p in (text or "").split(",")):
        if not item:
            continue
        signal, sep, amount = item.partition("<")
        signal, amount = signal.strip(), amount.strip()
        if not sep or not amount:
            raise ValueError(f"{item!r}: expected SIGNAL<QUANTITY, e.g. memory.available<100Mi")
        if signal not in SIGNALS:
            raise ValueError(f"{item!r}: unknown signal {signal!r} (known: {', '.join(SIGNALS)})")
        if signal in thresholds:
            raise ValueError(f"{item!r}: {signal} given twice")
        if amount.endswith("%"):
            try:
                pct = float(amount[:-1])
            except ValueError:
                raise ValueError(f"{item!r}: {amount!r} is not a percentage") from None
            if not 0 < pct <= 100:
                raise ValueError(f"{item!r}: a percentage must be in (0, 100]")
            thresholds[signal] = Threshold(signal, percentage=pct / 100)
        else:
            try:
                value = parse_quantity(amount)
            except QuantityError as exc:
                raise ValueError(f"{item!r}: {exc}") from None
            if value < 0:
                raise ValueError(f"{item!r}: must not be negative")
            thresholds[signal] = Threshold(signal, quantity=int(value))
    return list(thresholds.values())
