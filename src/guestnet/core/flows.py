"""FlowTable: a bounded map from a guest connection's 4-tuple to its NAT state.

A flow is keyed by ``(guest ip, guest port, destination ip, destination port)`` with the
addresses as the packed 4-byte header fields, so the datapath looks a segment up with the bytes
it already has, without formatting anything. The table never grows past ``capacity``: a new
flow beyond it is refused by the caller (TCP answers RST, UDP drops) and counted, so a guest
opening connections without end costs a bounded amount of memory and host descriptors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

#: (guest ip, guest port, destination ip, destination port); addresses packed.
FlowKey = tuple[bytes, int, bytes, int]

V = TypeVar("V")


class FlowTable(Generic[V]):
    """A dict with a capacity: ``add`` refuses (returns False) when full."""

    __slots__ = ("_flows", "capacity", "high_water")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("flow table capacity must be at least 1")
        self.capacity = capacity
        self._flows: dict[FlowKey, V] = {}
        self.high_water = 0

    def get(self, key: FlowKey) -> V | None:
        """The flow for ``key``, or None."""
        return self._flows.get(key)

    @property
    def full(self) -> bool:
        """True when no new flow fits."""
        return len(self._flows) >= self.capacity

    def add(self, key: FlowKey, flow: V) -> bool:
        """Insert ``flow`` (replacing one with the same key); False when the table is full."""
        flows = self._flows
        if key not in flows and len(flows) >= self.capacity:
            return False
        flows[key] = flow
        if len(flows) > self.high_water:
            self.high_water = len(flows)
        return True

    def remove(self, key: FlowKey, flow: V | None = None) -> None:
        """Forget ``key`` (only if it still maps to ``flow``, when ``flow`` is given)."""
        if flow is None or self._flows.get(key) is flow:
            self._flows.pop(key, None)

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[V]:
        return iter(list(self._flows.values()))

    def __contains__(self, key: object) -> bool:
        return key in self._flows
