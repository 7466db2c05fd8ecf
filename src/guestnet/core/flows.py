"""FlowTable: a bounded map from a guest connection's 4-tuple to its NAT state.

A flow is keyed by ``(guest ip, guest port, destination ip, destination port)`` with the
addresses as the packed 4-byte header fields, so the datapath looks a segment up with the bytes
it already has, without formatting anything. The table never grows past ``capacity``: a new
flow beyond it is refused by the caller (TCP answers RST, UDP drops) and counted, so a guest
opening connections without end costs a bounded amount of memory and host descriptors.

:class:`IdleFlows` is the other kind of table, for the UDP NAT and ICMP echo: flows that own a
host socket, kept in last-use order, so expiring idle ones stops at the first live flow and a
new flow beyond the bound evicts the least recently used (these protocols have no reset to
refuse with, and an idle mapping is cheap to lose) -- unless that one is itself in active use
(:meth:`IdleFlows.make_room`): then the newcomer is refused, so a sweep cannot push out live
flows.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, Protocol, TypeVar

from guestnet.counters import Counters

#: (guest ip, guest port, destination ip, destination port); addresses packed.
FlowKey = tuple[bytes, int, bytes, int]

V = TypeVar("V")


def ip_text(packed: bytes) -> str:
    """A packed address (4 or 16 bytes) as text, for the API's flow listings."""
    return str(ipaddress.ip_address(packed))


class FlowTable(Generic[V]):
    """A dict with a capacity: ``add`` refuses (returns False) when full."""

    __slots__ = ("_flows", "capacity", "high_water", "lookup")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("flow table capacity must be at least 1")
        self.capacity = capacity
        self._flows: dict[FlowKey, V] = {}
        self.high_water = 0
        #: :meth:`get` without its Python frame (the dict's own ``get``): for the per-segment
        #: lookups of the datapath.
        self.lookup = self._flows.get

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


class IdleFlow(Protocol):
    """What :class:`IdleFlows` needs of a flow."""

    last_used: float

    def close(self) -> None:
        """Release the flow's host endpoint (called once it leaves the table)."""


K = TypeVar("K", bound=Hashable)
F = TypeVar("F", bound=IdleFlow)


class IdleFlows(OrderedDict[K, F]):
    """Flows in last-use order (callers ``move_to_end`` on use); closed as they leave.

    Counts ``<prefix>.expired`` and ``<prefix>.evicted``.
    """

    __slots__ = ("counters", "prefix")

    def __init__(self, counters: Counters, prefix: str) -> None:
        super().__init__()
        self.counters = counters
        self.prefix = prefix

    def expire(self, now: float, timeout: float) -> int:
        """Close the flows idle for ``timeout`` seconds; return how many."""
        n = 0
        while self:
            key, flow = next(iter(self.items()))
            if flow.last_used + timeout > now:
                break
            del self[key]
            flow.close()
            self.counters.inc(f"{self.prefix}.expired")
            n += 1
        return n

    def evict_oldest(self) -> None:
        """Close the least recently used flow, to make room for a new one."""
        _, old = self.popitem(last=False)
        old.close()
        self.counters.inc(f"{self.prefix}.evicted")

    def make_room(self, now: float, active_s: float) -> bool:
        """Evict the least recently used flow for a newcomer, unless even that one was used in
        the last ``active_s`` seconds: a flow in active use is never given up for a newcomer (a
        source-port sweep then fills the table with its own flows and is refused, counted as
        ``<prefix>.refused_full``, while the guest's live flows carry on)."""
        _, oldest = next(iter(self.items()))
        if oldest.last_used + active_s > now:
            self.counters.inc(f"{self.prefix}.refused_full")
            return False
        self.evict_oldest()
        return True

    def close_all(self) -> None:
        """Close every flow and empty the table (instance shutdown)."""
        for flow in self.values():
            flow.close()
        self.clear()
